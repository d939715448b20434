"""Feature cache: exact get_intermediate_layers contract, bad images recorded, reuse and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexfound.adapt.token_cache import FeatureCache
from chexfound.data.transform import InputTransform
from chexfound.errors import ConfigError
from chexfound.io import read_image
from chexfound.models import create_backbone


def _live(backbone, paths, flip=False):
    tf = InputTransform.for_backbone(backbone.cfg)
    x = torch.stack([tf(read_image(p).pixels) for p in paths])
    with torch.no_grad():
        return backbone.get_intermediate_layers(x.flip(-1) if flip else x, n=2, return_class_token=True)


class _Counting(torch.nn.Module):
    """Wraps a backbone to count how many images go through it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.blocks = inner, inner.cfg, inner.blocks
        self.patch_size, self.embed_dim, self.seen = inner.patch_size, inner.embed_dim, 0

    def get_intermediate_layers(self, x, **kw):
        self.seen += x.shape[0]
        return self.inner.get_intermediate_layers(x, **kw)


def test_build_matches_live_backbone_and_records_bad_images(tmp_path, tiny_backbone, nih_paths):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = [nih_paths[0], bad, *nih_paths[1:4]]
    cache = FeatureCache.build(tiny_backbone, paths, tmp_path / "c", n_blocks=2, batch_size=2, flip_tta=True)
    assert len(cache) == 5 and cache.paths == [str(p) for p in paths]
    assert cache.valid.tolist() == [True, False, True, True, True]
    assert cache.errors[0][0] == 1 and "broken.png" in cache.errors[0][1]
    assert cache.grid == (4, 4) and cache.n_blocks == 2
    assert np.load(tmp_path / "c" / "patch.npy", mmap_mode="r").dtype == np.float16
    good = [0, 2, 3, 4]
    for flip in (False, True):
        want = _live(tiny_backbone, [paths[i] for i in good], flip=flip)
        got = cache.features([4, 0, 3, 2], flip=flip)  # any order: rows come back as asked
        order = [3, 0, 2, 1]
        assert len(got) == 2
        for (gp, gc), (wp, wc) in zip(got, want):
            assert gp.dtype == torch.float32 and gp.shape == wp.shape and gc.shape == wc.shape
            torch.testing.assert_close(gp, wp[order], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(gc, wc[order], atol=2e-3, rtol=2e-3)
    reopened = FeatureCache.open(tmp_path / "c")
    assert reopened.valid.tolist() == cache.valid.tolist() and reopened.has_flip


def test_rerun_reuses_and_interrupted_build_resumes(tmp_path, tiny_backbone, nih_paths):
    counting = _Counting(tiny_backbone)
    FeatureCache.build(counting, nih_paths, tmp_path / "c", n_blocks=2, batch_size=4)
    assert counting.seen == len(nih_paths)
    FeatureCache.build(counting, nih_paths, tmp_path / "c", n_blocks=2, batch_size=4)
    assert counting.seen == len(nih_paths)  # nothing recomputed
    # Simulate an interruption after the first rows: rows 3.. were never marked done.
    status = np.load(tmp_path / "c" / "status.npy")
    status[3:] = 0
    np.save(tmp_path / "c" / "status.npy", status)
    assert FeatureCache.open(tmp_path / "c").valid.sum() == 3
    cache = FeatureCache.build(counting, nih_paths, tmp_path / "c", n_blocks=2, batch_size=4)
    assert counting.seen == len(nih_paths) + 3 and cache.valid.all()


def test_other_backbone_or_inputs_are_refused(tmp_path, tiny_backbone, nih_paths):
    FeatureCache.build(tiny_backbone, nih_paths[:2], tmp_path / "c", n_blocks=1)
    torch.manual_seed(1)
    with pytest.raises(ConfigError, match="backbone_sha256"):
        FeatureCache.build(create_backbone("tiny_vit"), nih_paths[:2], tmp_path / "c", n_blocks=1)
    with pytest.raises(ConfigError, match="paths_sha256"):
        FeatureCache.build(tiny_backbone, nih_paths[:3], tmp_path / "c", n_blocks=1)
    with pytest.raises(ConfigError, match="n_blocks"):
        FeatureCache.build(tiny_backbone, nih_paths[:2], tmp_path / "d", n_blocks=3)
