"""Golden values for the pretraining losses, computed here by hand from the published formulas."""

import math

import numpy as np
import torch

from chexfound.ssl.centering import SoftmaxCentering, sinkhorn_knopp
from chexfound.ssl.losses import dino_cls_loss, dino_cross_entropy, ibot_patch_loss, koleo_loss


def _log_softmax(v, t):
    z = [x / t for x in v]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _ce(t, s, temp):
    return -sum(ti * li for ti, li in zip(t, _log_softmax(s, temp)))


def test_dino_cross_entropy_matches_hand_formula():
    s = [[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]]
    t = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    got = dino_cross_entropy(torch.tensor(s), torch.tensor(t), 0.1)
    want = [_ce(t[i], s[i], 0.1) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_dino_cls_loss_sums_pairs_of_batch_means():
    s1 = [[0.3, 0.1, -0.2], [0.9, -0.4, 0.0]]
    s2 = [[-0.1, 0.5, 0.2], [0.2, 0.2, 0.6]]
    t1 = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    t2 = [[0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]
    want = 0.0
    for s in (s1, s2):
        for t in (t1, t2):
            want += sum(_ce(t[b], s[b], 0.1) for b in range(2)) / 2
    got = dino_cls_loss([torch.tensor(s1), torch.tensor(s2)], [torch.tensor(t1), torch.tensor(t2)], 0.1)
    assert abs(float(got) - want) < 1e-4


def test_ibot_loss_weights_each_image_by_its_masked_count():
    # 3 images x 4 patches: image 0 has 2 masked patches, image 1 none, image 2 one.
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    s = [[0.2, 0.1], [0.5, -0.5], [-1.0, 1.0]]  # masked patches in row-major order
    t = [[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]
    ce = [_ce(t[i], s[i], 0.1) for i in range(3)]
    want = ((ce[0] + ce[1]) / 2 + 0.0 + ce[2] / 1) / 3  # mean over all 3 images, unmasked counts 0
    got = ibot_patch_loss(torch.tensor(s), torch.tensor(t), masks, 0.1)
    assert abs(float(got) - want) < 1e-4


def test_koleo_matches_nearest_neighbour_formula():
    angles = [0.0, 0.3, 1.5, 3.0]
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles]) * torch.tensor([[2.0], [1.0], [0.5], [3.0]])
    # On the unit circle the chord between angles a, b is 2 sin(|a - b| / 2).
    nn = []
    for i, a in enumerate(angles):
        nn.append(min(2 * math.sin(abs(a - b) / 2) for j, b in enumerate(angles) if j != i))
    want = -sum(math.log(d) for d in nn) / len(nn)
    assert abs(float(koleo_loss(x)) - want) < 1e-5


def test_koleo_finite_on_duplicates_and_low_precision():
    x = torch.randn(6, 16)
    x[1] = x[0]
    x[3] = x[0] * 5  # same direction: identical after normalisation
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert float(loss.detach()) < -math.log(1e-8) + 1e-3  # bounded by -log(eps)
    for dt in (torch.float16, torch.bfloat16):
        y = x.detach().to(dt).requires_grad_(True)
        ly = koleo_loss(y)
        ly.backward()
        assert torch.isfinite(ly) and torch.isfinite(y.grad.float()).all()


def _sk_reference(s, temp, iters):
    """The published Sinkhorn-Knopp (SwAV / DINOv2) in plain numpy, float64."""
    q = np.exp(np.asarray(s, dtype=np.float64) / temp).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_knopp_matches_reference_and_is_shift_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 5, generator=g) * 2 - 1
    got = sinkhorn_knopp(s, 0.07, 3)
    np.testing.assert_allclose(got.double().numpy(), _sk_reference(s.numpy(), 0.07, 3), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), np.ones(6), rtol=1e-5)
    # Huge scores would overflow exp() in the naive form; the max shift keeps it finite and identical.
    big = sinkhorn_knopp(s * 1e3, 70.0, 3)
    np.testing.assert_allclose(big.numpy(), got.numpy(), rtol=1e-4, atol=1e-7)
    assert torch.isfinite(sinkhorn_knopp(s * 1e4, 0.04, 3)).all()


def test_sinkhorn_knopp_equipartitions_prototypes():
    s = torch.rand(64, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # cosine scores
    q = sinkhorn_knopp(s, 0.1, 100)
    np.testing.assert_allclose(q.sum(dim=0).numpy(), np.full(8, 64 / 8), rtol=2e-3)


def test_softmax_centering_with_momentum():
    c = SoftmaxCentering(3, momentum=0.9)
    s1 = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    p = c.targets(s1, 0.5)
    np.testing.assert_allclose(p.numpy(), torch.softmax(s1 / 0.5, -1).numpy(), rtol=1e-6)  # center 0
    c.update(s1)
    want_c = 0.1 * np.array([0.5, 1.0, -0.5])
    np.testing.assert_allclose(c.center.numpy()[0], want_c, rtol=1e-6)
    s2 = torch.tensor([[0.3, 0.3, 0.3]])
    p2 = c.targets(s2, 0.5)
    z = (np.array([0.3, 0.3, 0.3]) - want_c) / 0.5
    want = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(p2.numpy()[0], want, rtol=1e-5)
    c.update(s2)
    np.testing.assert_allclose(c.center.numpy()[0], 0.9 * want_c + 0.1 * np.array([0.3, 0.3, 0.3]), rtol=1e-6)


def test_sinkhorn_knopp_and_centering_ignore_padding_rows():
    """A padded buffer (invalid rows anywhere) gives the valid rows exactly what they get alone."""
    from chexfound.ssl.centering import SoftmaxCentering, sinkhorn_knopp
    from chexfound.ssl.losses import ibot_patch_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 9, generator=g)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    alone = sinkhorn_knopp(s[valid], 0.07, 3)
    padded = sinkhorn_knopp(s, 0.07, 3, valid=valid)
    torch.testing.assert_close(padded[valid], alone, rtol=1e-6, atol=1e-7)
    assert (padded[~valid] == 0).all()
    assert (sinkhorn_knopp(s, 0.07, 3, valid=torch.zeros(12, dtype=torch.bool)) == 0).all()
    a, b = SoftmaxCentering(9, 0.9), SoftmaxCentering(9, 0.9)
    a.update(s[valid])
    b.update(s, valid.float())
    torch.testing.assert_close(a.center, b.center)
    b.update(s, torch.zeros(12))  # nothing valid: the centre stays
    torch.testing.assert_close(a.center, b.center)
    b.update(s * float("nan"))  # non-finite scores: the centre stays
    torch.testing.assert_close(a.center, b.center)
    # iBOT: weights 0 on padding rows give the loss of the masked rows alone
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, :2] = masks[2, 1:] = True
    st, tp = torch.randn(5, 9, generator=g), torch.softmax(torch.randn(5, 9, generator=g), -1)
    w = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])
    ref = ibot_patch_loss(st, tp, masks, 0.1)
    pad_st, pad_tp = torch.cat([st, torch.randn(2, 9, generator=g)]), torch.cat([tp, torch.zeros(2, 9)])
    torch.testing.assert_close(ibot_patch_loss(pad_st, pad_tp, masks, 0.1, weights=torch.cat([w, torch.zeros(2)])), ref)
