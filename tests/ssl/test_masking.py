import numpy as np

from chexfound.ssl.masking import BlockMaskGenerator, sample_batch_masks


def test_block_mask_counts_and_bounds():
    gen = BlockMaskGenerator((14, 14), min_patches=4, max_patches=98)
    rng = np.random.default_rng(0)
    for n in (0, 10, 40, 98):
        m = gen(n, rng)
        assert m.shape == (14, 14) and m.dtype == bool
        assert m.sum() <= n and (n == 0 or m.sum() >= 0.5 * n)


def test_batch_masks_follow_dinov2_collate():
    gen = BlockMaskGenerator((14, 14), min_patches=4, max_patches=98)
    rng = np.random.default_rng(1)
    masks = sample_batch_masks(20, gen, 0.5, (0.1, 0.5), rng).numpy()
    assert masks.shape == (20, 196)
    counts = masks.sum(1)
    assert (counts > 0).sum() == 10  # int(20 * 0.5) masked crops, the rest none
    frac = np.sort(counts[counts > 0]) / 196
    assert frac.max() <= 0.5 + 1e-9 and frac.min() >= 0.05
    # stratified ratios: the masked fractions spread over the whole range
    assert frac.max() - frac.min() > 0.2
    again = sample_batch_masks(20, gen, 0.5, (0.1, 0.5), np.random.default_rng(1)).numpy()
    assert np.array_equal(masks, again)


def test_tiny_grid_does_not_hang():
    gen = BlockMaskGenerator((2, 2), min_patches=4, max_patches=2)
    m = sample_batch_masks(8, gen, 1.0, (0.1, 0.5), np.random.default_rng(0))
    assert m.shape == (8, 4)
