"""Losses against their formulas: masking, ASL, Cox (Breslow) vs a direct computation, class balance."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from chexfound.adapt.losses import (
    asymmetric_loss,
    build_loss,
    class_balance_weights,
    cox_partial_likelihood,
    masked_bce,
    masked_cross_entropy,
)


def _labels():
    y = torch.tensor([[1.0, 0.0, float("nan")], [float("nan"), 1.0, 0.0], [0.0, float("nan"), 1.0],
                      [1.0, 1.0, float("nan")]])
    return y


def test_masked_bce_ignores_unlabelled_entries():
    torch.manual_seed(0)
    y = _labels()
    x = torch.randn(4, 3, requires_grad=True)
    loss = masked_bce(x, y)
    m = ~torch.isnan(y)
    want = F.binary_cross_entropy_with_logits(x[m], y[m])
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.all(x.grad[~m] == 0) and torch.all(x.grad[m] != 0)
    # Changing logits where there is no label changes nothing.
    x2 = x.detach().clone()
    x2[~m] = 100.0
    torch.testing.assert_close(masked_bce(x2, y), loss.detach())
    # Leading (grid) dims give one loss per config.
    xs = torch.stack([x.detach(), x2, -x.detach()])
    out = masked_bce(xs, y)
    assert out.shape == (3,)
    torch.testing.assert_close(out[:2], torch.stack([loss.detach()] * 2))


def test_asl_matches_its_formula_and_focusing_weights_carry_no_gradient():
    torch.manual_seed(0)
    y = _labels()
    x = (torch.randn(4, 3) * 2).requires_grad_()
    gn, gp, clip, eps = 4.0, 1.0, 0.05, 1e-8
    loss = asymmetric_loss(x, y, gamma_neg=gn, gamma_pos=gp, clip=clip, eps=eps)
    xv, yv = x.detach().numpy().astype(np.float64), y.numpy().astype(np.float64)
    terms = []
    grads = np.zeros_like(xv)
    n = int((~np.isnan(yv)).sum())
    for i, j in np.ndindex(*xv.shape):
        if np.isnan(yv[i, j]):
            continue
        p = 1 / (1 + math.exp(-xv[i, j]))
        if yv[i, j] == 1:
            w = (1 - p) ** gp
            terms.append(-w * math.log(max(p, eps)))
            grads[i, j] = -w * (1 - p) / n
        else:
            pm = min(1 - p + clip, 1.0)
            w = (1 - pm) ** gn
            terms.append(-w * math.log(max(pm, eps)))
            grads[i, j] = (w * p * (1 - p) / pm if pm < 1 else 0.0) / n
    assert math.isclose(float(loss.detach()), sum(terms) / n, rel_tol=1e-5)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), grads, rtol=1e-4, atol=1e-7)


def _cox_direct(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """-1/#events * sum over events of [r_i - log sum_{j: t_j >= t_i} exp r_j], pair by pair."""
    total, n_ev = 0.0, 0
    for i in range(len(time)):
        if event[i] != 1:
            continue
        n_ev += 1
        s = sum(math.exp(risk[j]) for j in range(len(time)) if time[j] >= time[i])
        total += risk[i] - math.log(s)
    return -total / n_ev


def test_cox_partial_likelihood_matches_direct_computation_with_ties():
    rng = np.random.default_rng(0)
    time = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 8.0, 2.0, 6.0, np.nan])
    event = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    risks = rng.normal(size=(3, 10))
    got = cox_partial_likelihood(torch.tensor(risks), torch.tensor(time), torch.tensor(event))
    keep = ~np.isnan(time)
    want = [_cox_direct(r[keep], time[keep], event[keep]) for r in risks]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # Gradient as well (vs autograd through the direct formula written in torch).
    r = torch.tensor(risks[0], requires_grad=True)
    cox_partial_likelihood(r, torch.tensor(time), torch.tensor(event)).backward()
    r2 = torch.tensor(risks[0][keep], requires_grad=True)
    t, e = torch.tensor(time[keep]), torch.tensor(event[keep])
    direct = -sum(r2[i] - torch.logsumexp(r2[t >= t[i]], 0) for i in range(len(t)) if e[i] == 1) / e.sum()
    direct.backward()
    np.testing.assert_allclose(r.grad.numpy()[keep], r2.grad.numpy(), rtol=1e-10)
    assert r.grad[~torch.tensor(keep)].abs().sum() == 0
    # No events -> zero loss (no information), still differentiable.
    z = cox_partial_likelihood(r, torch.tensor(time), torch.zeros(10, dtype=torch.float64))
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_multiclass_ce_ignores_unlabelled_rows():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    t = torch.tensor([0.0, 3.0, float("nan"), 1.0, 2.0])
    got = masked_cross_entropy(x, t)
    keep = ~torch.isnan(t)
    want = torch.stack([F.cross_entropy(xi[keep], t[keep].long()) for xi in x])
    torch.testing.assert_close(got, want)


def test_class_balance_weights():
    y = np.array([[1, 0], [0, 0], [0, 0], [0, np.nan], [1, 1]], dtype=np.float32)
    pw, cw = class_balance_weights(y, "pos_weight")
    assert cw is None
    np.testing.assert_allclose(pw.numpy(), [3 / 2, 3 / 1])
    _, cw = class_balance_weights(y, "effective", beta=0.9)
    eff = (1 - 0.9 ** np.array([2.0, 1.0])) / 0.1
    np.testing.assert_allclose(cw.numpy(), (1 / eff) / (1 / eff).mean(), rtol=1e-6)
    assert cw[1] > cw[0]  # the rarer class weighs more
    fn = build_loss("multilabel", "bce", y, 2, "pos_weight")
    x = torch.zeros(5, 2)
    yt = torch.tensor(y)
    m = ~torch.isnan(yt)
    elementwise = F.binary_cross_entropy_with_logits(x, torch.nan_to_num(yt), pos_weight=pw, reduction="none")
    want = (elementwise * m).sum() / m.sum()
    torch.testing.assert_close(fn(x, yt), want)
