import torch

from chexfound.models import create_backbone


def test_intermediate_layers_shapes_and_order():
    torch.manual_seed(0)
    m = create_backbone("tiny_vit").eval()
    x = torch.randn(2, 3, 64, 64)
    out = m.get_intermediate_layers(x, 2, return_class_token=True)
    assert len(out) == 2
    for patches, cls in out:
        assert patches.shape == (2, 16, 64) and cls.shape == (2, 64)
    feats = m.forward_features(x)
    torch.testing.assert_close(feats["x_norm_clstoken"], out[-1][1])
    torch.testing.assert_close(feats["x_norm_patchtokens"], out[-1][0])
    assert feats["x_norm_regtokens"].shape == (2, 2, 64)
