"""Do the features separate findings? Linear-probe and k-NN AUROC on a small labelled hold-out.

Features of a frozen backbone: the final-norm CLS token concatenated with the mean patch token (DINOv2's
linear evaluation with avgpool, last block). Linear probe: standardised features, L2 logistic regression
with C picked by 3-fold CV on the probe's train split. k-NN: cosine similarity, the k nearest train images
vote with weights exp(sim / 0.07) (DINO's k-NN). Multilabel tasks (NIH-14) report the mean AUROC over
findings that have both classes in train and test.

Default task: Kermany (NORMAL vs PNEUMONIA), a random subset of its official train split to fit, a random
subset of its official test split to score. NIH-14 (optional): a seeded patient split, the same one a
pretraining source can use to hold those patients out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from chexfound.data.manifest import patient_split, read_manifest
from chexfound.data.readers import read_kermany
from chexfound.data.transform import InputTransform
from chexfound.models.extract import extract_features
from chexfound.models.vit import VisionTransformer
from chexfound.ssl.data import Skipped, decode_all

log = logging.getLogger(__name__)


@dataclass
class ProbeTask:
    name: str
    train_images: Tensor  # uint8 [n, 1, S, S]
    train_labels: np.ndarray  # [n, C] float with NaN = unlabelled
    test_images: Tensor
    test_labels: np.ndarray
    label_names: list[str]

    @property
    def multilabel(self) -> bool:
        return self.train_labels.shape[1] > 1


def _subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n)[: min(k, n)])


def _load(paths: list[Path], labels: np.ndarray, size: int, workers: int) -> tuple[Tensor, np.ndarray]:
    skipped = Skipped()
    images, keep = decode_all(paths, size, workers, skipped)
    if skipped.items:
        log.warning("probe: %d unreadable image(s) skipped, e.g. %s", len(skipped.items), skipped.items[0])
    return images, labels[keep]


def kermany_task(root: str | Path, size: int, n_train: int, n_test: int, seed: int = 0,
                 workers: int = 0) -> ProbeTask:
    m = read_kermany(root)
    rng = np.random.default_rng(seed)
    tr, te = m.split("train"), m.split("test")
    itr, ite = _subset(len(tr), n_train, rng), _subset(len(te), n_test, rng)
    ptr, pte = tr.paths(), te.paths()  # (paths() builds the whole list: once)
    xtr, ytr = _load([ptr[i] for i in itr], tr.labels()[itr], size, workers)
    xte, yte = _load([pte[i] for i in ite], te.labels()[ite], size, workers)
    return ProbeTask("kermany", xtr, ytr, xte, yte, list(m.label_columns))


NIH_EXCLUDE = ("Hernia",)  # 2 positives in the shared subset: no meaningful AUROC


def nih14_task(root: str | Path, size: int, n_train: int, n_test: int, seed: int = 0, workers: int = 0,
               fractions: tuple[float, float] = (0.7, 0.3)) -> ProbeTask:
    """Patient split (names dev/test, `seed`), the same as a pretraining source with patient_split."""
    m = read_manifest(Path(root) / "labels.csv")
    m.label_columns = [c for c in m.label_columns if c not in NIH_EXCLUDE and c != "no_finding"]
    split = patient_split(m.patients(), list(fractions), ["dev", "test"], seed)
    rng = np.random.default_rng(seed)
    dev, test = m.subset(split == "dev"), m.subset(split == "test")
    idev, ite = _subset(len(dev), n_train, rng), _subset(len(test), n_test, rng)
    pdev, pte = dev.paths(), test.paths()
    xtr, ytr = _load([pdev[i] for i in idev], dev.labels()[idev], size, workers)
    xte, yte = _load([pte[i] for i in ite], test.labels()[ite], size, workers)
    return ProbeTask("nih14", xtr, ytr, xte, yte, list(m.label_columns))


# -- features --------------------------------------------------------------------------------------
def backbone_features(model: VisionTransformer, images: Tensor, device: torch.device, batch_size: int = 64,
                      autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """[N, 2D]: final-norm CLS + mean patch token of the last block, from the project's feature engine
    (uint8 images normalised on the device by the backbone's input transform)."""
    tf = InputTransform.for_backbone(model.cfg, size=images.shape[-1])
    feats = extract_features(model, images, n_blocks=1, transform=tf, batch_size=batch_size, device=device,
                             autocast=autocast)
    return feats.vectors(1, avgpool=True)


def pixel_features(images: Tensor, size: int = 32) -> np.ndarray:
    """The raw-pixel baseline: each image area-resized to size x size, flattened."""
    x = torch.nn.functional.interpolate(images.float() / 255.0, size=(size, size), mode="area")
    return x.flatten(1).numpy()


# -- probes ----------------------------------------------------------------------------------------
def _columns(ytr: np.ndarray, yte: np.ndarray) -> list[int]:
    cols = []
    for c in range(ytr.shape[1]):
        a, b = ytr[:, c], yte[:, c]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if len(np.unique(a)) == 2 and len(np.unique(b)) == 2:
            cols.append(c)
    return cols


def linear_probe_scores(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, seed: int = 0,
                        n_jobs: int = 1) -> np.ndarray:
    """Test scores [n_test, C] (NaN for columns that cannot be fitted)."""
    sc = StandardScaler().fit(ftr)
    a, b = sc.transform(ftr), sc.transform(fte)
    out = np.full((fte.shape[0], ytr.shape[1]), np.nan)
    for c in range(ytr.shape[1]):
        ok = ~np.isnan(ytr[:, c])
        y = ytr[ok, c]
        if len(np.unique(y)) < 2 or min(np.bincount(y.astype(int))) < 3:
            continue
        clf = GridSearchCV(LogisticRegression(max_iter=2000, random_state=seed),
                           {"C": [1e-3, 1e-2, 1e-1, 1.0]}, cv=3, scoring="roc_auc", n_jobs=n_jobs)
        clf.fit(a[ok], y)
        out[:, c] = clf.decision_function(b)
    return out


def knn_scores(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, k: int = 20, t: float = 0.07) -> np.ndarray:
    a = ftr / np.linalg.norm(ftr, axis=1, keepdims=True).clip(1e-12)
    b = fte / np.linalg.norm(fte, axis=1, keepdims=True).clip(1e-12)
    sim = b @ a.T
    k = min(k, a.shape[0])
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, nn, axis=1) / t)
    out = np.full((fte.shape[0], ytr.shape[1]), np.nan)
    for c in range(ytr.shape[1]):
        y = np.nan_to_num(ytr[:, c], nan=0.0)[nn]
        lab = (~np.isnan(ytr[:, c]))[nn]
        out[:, c] = (w * y * lab).sum(1) / np.clip((w * lab).sum(1), 1e-12, None)
    return out


def mean_auroc(scores: np.ndarray, yte: np.ndarray, cols: list[int]) -> float:
    vals = []
    for c in cols:
        ok = ~np.isnan(yte[:, c]) & ~np.isnan(scores[:, c])
        if ok.sum() and len(np.unique(yte[ok, c])) == 2:
            vals.append(roc_auc_score(yte[ok, c], scores[ok, c]))
    return float(np.mean(vals)) if vals else float("nan")


def auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of y/s [B, n] at once (Mann-Whitney with average ranks for ties, i.e. exactly
    roc_auc_score); NaN for rows with one class only."""
    from scipy.stats import rankdata

    r = rankdata(s, axis=1)
    npos = y.sum(axis=1)
    nneg = y.shape[1] - npos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((r * y).sum(axis=1) - npos * (npos + 1) / 2) / (npos * nneg)
    auc[(npos == 0) | (nneg == 0)] = np.nan
    return auc


def _bootstrap_mean_auroc(scores: np.ndarray, yte: np.ndarray, cols: list[int], idx: np.ndarray) -> np.ndarray:
    """Mean AUROC over `cols` for each bootstrap resample (rows of idx [B, n]); NaN where undefined."""
    per_col = []
    for c in cols:
        y, s = yte[:, c], scores[:, c]
        if np.isnan(y).any() or np.isnan(s).any():  # rare: fall back to the per-resample path
            per_col.append(np.array([mean_auroc(scores[i], yte[i], [c]) for i in idx]))
        else:
            per_col.append(auroc_rows(y[idx], s[idx]))
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(per_col), axis=0) if per_col else np.full(len(idx), np.nan)


def bootstrap_ci(scores: np.ndarray, yte: np.ndarray, cols: list[int], n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    idx = np.random.default_rng(seed).integers(0, len(yte), (n, len(yte)))
    vals = _bootstrap_mean_auroc(scores, yte, cols, idx)
    vals = vals[~np.isnan(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def evaluate_features(ftr: np.ndarray, fte: np.ndarray, task: ProbeTask, knn_k: int = 20,
                      linear: bool = True, ci: bool = False) -> dict[str, float]:
    cols = _columns(task.train_labels, task.test_labels)
    res = {"knn_auroc": mean_auroc(knn_scores(ftr, task.train_labels, fte, knn_k), task.test_labels, cols)}
    if linear:
        s = linear_probe_scores(ftr, task.train_labels, fte)
        res["linear_auroc"] = mean_auroc(s, task.test_labels, cols)
        if ci:
            res["linear_auroc_lo"], res["linear_auroc_hi"] = bootstrap_ci(s, task.test_labels, cols)
            res["_scores"] = s  # type: ignore[assignment]
    return res


def probe_backbone(model: VisionTransformer, task: ProbeTask, device: torch.device, knn_k: int = 20,
                   batch_size: int = 64, linear: bool = True, ci: bool = False,
                   autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    ftr = backbone_features(model, task.train_images, device, batch_size, autocast)
    fte = backbone_features(model, task.test_images, device, batch_size, autocast)
    return evaluate_features(ftr, fte, task, knn_k, linear, ci)


def paired_bootstrap_diff(s_a: np.ndarray, s_b: np.ndarray, yte: np.ndarray, cols: list[int], n: int = 1000,
                          seed: int = 0) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) on the same test images (the same resamples for both): point value and 95% CI."""
    idx = np.random.default_rng(seed).integers(0, len(yte), (n, len(yte)))
    point = mean_auroc(s_a, yte, cols) - mean_auroc(s_b, yte, cols)
    d = _bootstrap_mean_auroc(s_a, yte, cols, idx) - _bootstrap_mean_auroc(s_b, yte, cols, idx)
    d = d[~np.isnan(d)]
    return point, float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def task_columns(task: ProbeTask) -> list[int]:
    return _columns(task.train_labels, task.test_labels)
