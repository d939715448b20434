import numpy as np
import pytest
import torch

from chexfound.errors import ConfigError
from chexfound.ssl.augment import (AUGMENT_PRESETS, AugmentConfig, MultiCropAugment, augment_config, crop_resize,
                                   gaussian_blur, jitter, sample_crop_boxes, solarize)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(b=3, s=32):
    g = _gen(5)
    return torch.randint(0, 256, (b, 1, s, s), generator=g, dtype=torch.uint8)


def test_presets_document_the_inverted_blur():
    assert AUGMENT_PRESETS["dinov2_original"].blur_p == (0.0, 0.9, 0.5)
    assert AUGMENT_PRESETS["cxr"].blur_p == (1.0, 0.1, 0.5)
    with pytest.raises(ConfigError):
        augment_config("cxr", {"saturation": 0.2})  # colour ops on grayscale are not offered


def test_multicrop_shapes_order_and_determinism():
    aug = MultiCropAugment(32, 16, 3, (0.32, 1.0), (0.05, 0.32), augment_config("cxr"), MEAN, STD)
    x = _images()
    a = aug(x, _gen(1))
    b = aug(x, _gen(1))
    c = aug(x, _gen(2))
    assert a["global_crops"].shape == (6, 3, 32, 32) and a["local_crops"].shape == (9, 3, 16, 16)
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert not torch.equal(a["global_crops"], c["global_crops"])
    # 3 channels are the normalised copies of one grayscale crop
    g = a["global_crops"]
    gray0 = g[:, 0] * STD[0] + MEAN[0]
    torch.testing.assert_close(g[:, 1] * STD[1] + MEAN[1], gray0, atol=1e-5, rtol=0)


def test_crop_resize_identity_flip_and_view_order():
    x = torch.rand(2, 1, 8, 8)
    full = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(2, 2, 4)
    flip = torch.tensor([[False, False], [True, True]])
    out = crop_resize(x, full, flip, 8, "bilinear")
    torch.testing.assert_close(out[:2], x)  # view 0 of both images: identity
    torch.testing.assert_close(out[2:], x.flip(-1))  # view 1: mirrored
    # A box resampled to its own size is exactly those pixels (pixel centres align).
    box = torch.tensor([2.0, 4.0, 4.0, 4.0]).expand(1, 2, 4)
    out = crop_resize(x, box, torch.zeros(1, 2, dtype=torch.bool), 4, "bilinear")
    torch.testing.assert_close(out, x[:, :, 2:6, 4:8])


def test_crop_boxes_respect_scale_and_ratio():
    boxes = sample_crop_boxes(500, 64, 64, (0.2, 0.6), (3 / 4, 4 / 3), _gen(3), torch.device("cpu"))
    top, left, h, w = boxes.unbind(1)
    area = h * w / (64 * 64)
    assert (area > 0.15).all() and (area < 0.7).all()
    assert ((w / h) > 0.65).all() and ((w / h) < 1.5).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()


def test_blur_keeps_constant_images_and_probabilities():
    cfg = AugmentConfig()
    flat = torch.full((4, 1, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0, cfg, _gen()), flat)
    x = torch.rand(200, 1, 12, 12, generator=_gen(1))
    y = gaussian_blur(x, 0.5, cfg, _gen(2))
    changed = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert 70 < int(changed.sum()) < 130
    assert torch.equal(gaussian_blur(x, 0.0, cfg, _gen(2)), x)


def test_solarize_and_jitter():
    x = torch.tensor([0.2, 0.6, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(solarize(x, 1.0, 128 / 255, _gen()), torch.tensor([0.2, 0.4, 0.1]).view(1, 1, 1, 3))
    img = torch.rand(50, 1, 8, 8, generator=_gen(4))
    off = AugmentConfig(jitter_p=0.0)
    assert torch.equal(jitter(img, off, _gen()), img)
    on = jitter(img, AugmentConfig(jitter_p=1.0), _gen())
    assert on.min() >= 0 and on.max() <= 1 and not torch.equal(on, img)


def test_real_cxr_through_multicrop(data_root):
    from chexfound.io import read_image
    from chexfound.ssl.data import PrepareImage

    p = sorted((data_root / "kermany" / "dataset" / "test" / "NORMAL").glob("*.jpeg"))[0]
    x = PrepareImage(64)(read_image(p).pixels)
    assert x.dtype == torch.uint8 and x.shape == (1, 64, 64)
    aug = MultiCropAugment(64, 32, 2, (0.32, 1.0), (0.05, 0.32), augment_config("dinov2_original"), MEAN, STD)
    out = aug(x[None], _gen())
    assert np.isfinite(out["global_crops"].numpy()).all() and out["local_crops"].shape == (2, 3, 32, 32)


def test_static_blur_equals_the_subset_blur():
    """On a GPU the blur runs on every crop and keeps the drawn ones (no sync); on the CPU it indexes the drawn
    subset. Same draws, same pixels."""
    from chexfound.ssl.augment import blur_params, blur_rows

    cfg = AugmentConfig()
    x = torch.rand(40, 1, 16, 16, generator=_gen(6))
    sigma, apply = blur_params(40, 0.5, cfg, _gen(7), x.device)
    a = blur_rows(x, sigma, apply, cfg.blur_kernel, static_shapes=True)
    b = blur_rows(x, sigma, apply, cfg.blur_kernel, static_shapes=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(a[~apply], x[~apply]) and not torch.equal(a[apply], x[apply])
    aug = MultiCropAugment(32, 16, 3, (0.32, 1.0), (0.05, 0.32), augment_config("cxr"), MEAN, STD)
    ref = aug(_images(), _gen(8))
    aug.static_shapes = True
    out = aug(_images(), _gen(8))
    for k in ("global_crops", "local_crops"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-5)


def test_jitter_applies_brightness_and_contrast_in_the_drawn_order():
    """Each image: torchvision's brightness then contrast, or contrast then brightness, as drawn."""
    cfg = AugmentConfig(jitter_p=1.0)
    x = torch.rand(64, 1, 6, 6, generator=_gen(9))
    out = jitter(x, cfg, _gen(10))
    g = _gen(10)  # the same draws, by hand
    b = 0.6 + 0.8 * torch.rand(64, generator=g)
    c = 0.6 + 0.8 * torch.rand(64, generator=g)
    b_first = torch.rand(64, 2, generator=g)[:, 1] < 0.5

    def bright(img, f):
        return (img * f).clamp(0, 1)

    def contrast(img, f):
        return (f * img + (1 - f) * img.mean()).clamp(0, 1)

    for i in range(64):
        want = contrast(bright(x[i], b[i]), c[i]) if b_first[i] else bright(contrast(x[i], c[i]), b[i])
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    assert 15 < int(b_first.sum()) < 49


def test_separable_crop_grid_equals_affine_grid():
    """crop_resize builds the sampling grid by broadcasting; F.affine_grid with the same theta is the reference."""
    import torch.nn.functional as F

    x = torch.rand(3, 1, 20, 24, generator=_gen(11))
    boxes = sample_crop_boxes(2 * 3, 20, 24, (0.1, 1.0), (3 / 4, 4 / 3), _gen(12), x.device).view(2, 3, 4)
    flip = torch.rand(2, 3, generator=_gen(13)) < 0.5
    out = crop_resize(x, boxes, flip, 12, "bilinear")
    for v in range(2):
        top, left, h, w = boxes[v].unbind(1)
        theta = torch.zeros(3, 2, 3)
        theta[:, 0, 0] = (w / 24) * torch.where(flip[v], -1.0, 1.0)
        theta[:, 0, 2] = -1.0 + (2 * left + w) / 24
        theta[:, 1, 1] = h / 20
        theta[:, 1, 2] = -1.0 + (2 * top + h) / 20
        grid = F.affine_grid(theta, [3, 1, 12, 12], align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(out[v * 3:(v + 1) * 3], ref, rtol=1e-5, atol=1e-6)
