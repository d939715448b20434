import numpy as np
import torch

from chexfound.ssl.losses.ibot import masked_patch_weights
from chexfound.ssl.masking import (BlockMaskGenerator, DeviceBlockMasks, gather_masked, masked_patch_bound,
                                   sample_batch_masks, sample_batch_masks_device)


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


# -- on the device -----------------------------------------------------------------------------------

def _mask_stats(masks: np.ndarray, grid: int) -> dict[str, float]:
    """Mean masked fraction, share of masked images, blockiness (masked 4-neighbour pairs per masked patch),
    border/inner marginal ratio and share of images that got exactly their target (given)."""
    m = masks.reshape(-1, grid, grid).astype(bool)
    counts = m.sum(axis=(1, 2))
    pairs = (m[:, 1:] & m[:, :-1]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()
    border = np.zeros((grid, grid), bool)
    border[0] = border[-1] = border[:, 0] = border[:, -1] = True
    marg = m.mean(0)
    return {"fraction": counts.mean() / grid**2, "masked_images": (counts > 0).mean(),
            "pairs_per_patch": pairs / counts.sum(), "border_vs_inner": marg[border].mean() / marg[~border].mean()}


def test_device_masks_keep_the_beit_statistics():
    """Same recipe, different random stream: the statistics of 3,840 masks agree with BEiT's host loop."""
    grid = 14
    host = BlockMaskGenerator((grid, grid), min_patches=4, max_patches=98)
    dev = DeviceBlockMasks((grid, grid), min_patches=4, max_patches=98)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    h = np.concatenate([sample_batch_masks(64, host, 0.5, (0.1, 0.5), rng).numpy() for _ in range(60)])
    d = torch.cat([sample_batch_masks_device(64, dev, 0.5, (0.1, 0.5), gen, torch.device("cpu"))
                   for _ in range(60)]).numpy()
    sh, sd = _mask_stats(h, grid), _mask_stats(d, grid)
    assert sd["masked_images"] == sh["masked_images"] == 0.5
    assert abs(sd["fraction"] - sh["fraction"]) < 0.004  # ~0.149 both
    assert abs(sd["pairs_per_patch"] / sh["pairs_per_patch"] - 1) < 0.03  # blocks, not scattered patches
    assert abs(sd["border_vs_inner"] / sh["border_vs_inner"] - 1) < 0.1


def test_device_masks_reach_their_targets_like_beit():
    grid = 14
    host = BlockMaskGenerator((grid, grid), min_patches=4, max_patches=98)
    dev = DeviceBlockMasks((grid, grid), min_patches=4, max_patches=98)
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 99, size=2000)
    h = np.array([host(int(n), rng).sum() for n in targets])
    d = dev(torch.from_numpy(targets), torch.Generator().manual_seed(1)).sum(dim=(1, 2)).numpy()
    assert (d <= targets).all() and (h <= targets).all()  # never more than asked
    assert abs((d == targets).mean() - (h == targets).mean()) < 0.03
    assert abs(d.mean() / h.mean() - 1) < 0.01
    # zero target: nothing; the rounds suffice (an image stops when full or when 10 tries fail)
    assert dev(torch.zeros(3, dtype=torch.long), torch.Generator()).sum() == 0


def test_device_masks_are_seeded_and_follow_the_collate_recipe():
    dev = DeviceBlockMasks((14, 14), min_patches=4, max_patches=98)
    a = sample_batch_masks_device(20, dev, 0.5, (0.1, 0.5), torch.Generator().manual_seed(3), torch.device("cpu"))
    b = sample_batch_masks_device(20, dev, 0.5, (0.1, 0.5), torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (20, 196) and a.dtype == torch.bool
    counts = a.sum(1).numpy()
    assert (counts > 0).sum() == 10
    frac = np.sort(counts[counts > 0]) / 196
    assert frac.max() <= 0.5 + 1e-9 and frac.min() >= 0.05 and frac.max() - frac.min() > 0.2
    tiny = sample_batch_masks_device(8, DeviceBlockMasks((2, 2), min_patches=4, max_patches=2), 1.0, (0.1, 0.5), torch.Generator(),
                                     torch.device("cpu"))
    assert tiny.shape == (8, 4)


def test_gather_masked_is_a_padded_nonzero_within_dinov2s_bound():
    dev = DeviceBlockMasks((14, 14), min_patches=4, max_patches=98)
    for seed in range(5):
        masks = sample_batch_masks_device(16, dev, 0.5, (0.1, 0.5), torch.Generator().manual_seed(seed),
                                          torch.device("cpu"))
        bound = masked_patch_bound(16, 196, 0.5, (0.1, 0.5))
        mp = gather_masked(masks, bound)
        ref = masks.flatten().nonzero().flatten()
        n = ref.numel()
        assert n <= bound and int(mp.count) == n and mp.idx.shape == (bound,)
        assert torch.equal(mp.idx[:n], ref) and mp.valid[:n].all() and not mp.valid[n:].any()
        torch.testing.assert_close(mp.weight[:n], masked_patch_weights(masks))
        assert (mp.weight[n:] == 0).all()
    # DINOv2's bound: sum over masked images of int(N * upper edge of the ratio interval)
    assert masked_patch_bound(4, 100, 0.5, (0.1, 0.5)) == int(100 * 0.3) + int(100 * 0.5)
    assert masked_patch_bound(1, 100, 0.5, (0.1, 0.5)) == 1  # no masked image: one padding row
