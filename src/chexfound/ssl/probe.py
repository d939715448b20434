"""Do the features separate findings? Linear-probe and k-NN AUROC on a small labelled hold-out.

Features of a frozen backbone: the final-norm CLS token concatenated with the mean patch token (DINOv2's
linear evaluation with avgpool, last block). The statistics are the project's one statistics layer
(`chexfound.stats`): the linear probe is its logistic probe (standardised features, L2 logistic regression,
C chosen by 3-fold cross-validation on the probe's train split, folds of whole patients), k-NN its weighted
k-NN (the k nearest train images vote with weights exp(sim / 0.07), DINO's k-NN). Multilabel tasks (NIH-14)
report the mean AUROC over findings that have both classes in train and test. `probe_comparison` is the final
comparison's statistics on one probe set (the teacher against its baselines, `chexfound.stats.compare_scores`).

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
from torch import Tensor

from chexfound.data.manifest import patient_split, read_manifest
from chexfound.data.readers import read_kermany
from chexfound.data.transform import InputTransform
from chexfound.models.extract import extract_features
from chexfound.models.vit import VisionTransformer
from chexfound.ssl.config import expand_path
from chexfound.ssl.data import Skipped, decode_all
from chexfound.stats import BootstrapConfig, Comparison, compare_scores, fit_probe, knn_scores
from chexfound.stats.ranking import macro_auroc

log = logging.getLogger(__name__)


@dataclass
class ProbeTask:
    name: str
    train_images: Tensor  # uint8 [n, 1, S, S]
    train_labels: np.ndarray  # [n, C] float with NaN = unlabelled
    test_images: Tensor
    test_labels: np.ndarray
    label_names: list[str]
    train_groups: np.ndarray | None = None  # patient ids [n] (cross-validation folds of whole patients)
    test_groups: np.ndarray | None = None   # patient ids (the bootstrap resamples patients)

    @property
    def multilabel(self) -> bool:
        return self.train_labels.shape[1] > 1


def _subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n)[: min(k, n)])


def _load(paths: list[Path], labels: np.ndarray, patients: np.ndarray, size: int,
          workers: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    skipped = Skipped()
    images, keep = decode_all(paths, size, workers, skipped)
    if skipped.items:
        log.warning("probe: %d unreadable image(s) skipped, e.g. %s", len(skipped.items), skipped.items[0])
    return images, labels[keep], np.asarray(patients)[keep]


def kermany_task(root: str | Path, size: int, n_train: int, n_test: int, seed: int = 0,
                 workers: int = 0) -> ProbeTask:
    m = read_kermany(root)
    rng = np.random.default_rng(seed)
    tr, te = m.split("train"), m.split("test")
    itr, ite = _subset(len(tr), n_train, rng), _subset(len(te), n_test, rng)
    ptr, pte = tr.paths(), te.paths()  # (paths() builds the whole list: once)
    # Kermany's patient keys are only unique within a split: the reader prefixes them with it.
    xtr, ytr, gtr = _load([ptr[i] for i in itr], tr.labels()[itr], tr.patients()[itr], size, workers)
    xte, yte, gte = _load([pte[i] for i in ite], te.labels()[ite], te.patients()[ite], size, workers)
    return ProbeTask("kermany", xtr, ytr, xte, yte, list(m.label_columns), gtr, gte)


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
    xtr, ytr, gtr = _load([pdev[i] for i in idev], dev.labels()[idev], dev.patients()[idev], size, workers)
    xte, yte, gte = _load([pte[i] for i in ite], test.labels()[ite], test.patients()[ite], size, workers)
    return ProbeTask("nih14", xtr, ytr, xte, yte, list(m.label_columns), gtr, gte)


# -- features --------------------------------------------------------------------------------------
def backbone_features(model: VisionTransformer, images: Tensor, device: torch.device, batch_size: int = 64,
                      autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """[N, 2D]: final-norm CLS + mean patch token of the last block, from the project's feature engine
    (uint8 images normalised on the device by the backbone's input transform)."""
    tf = InputTransform.for_backbone(model.cfg, size=images.shape[-1])
    feats = extract_features(model, images, n_blocks=1, transform=tf, batch_size=batch_size, device=device,
                             autocast=autocast)
    return feats.vectors(1, avgpool=True)


# -- probes ----------------------------------------------------------------------------------------
def _columns(ytr: np.ndarray, yte: np.ndarray) -> list[int]:
    cols = []
    for c in range(ytr.shape[1]):
        a, b = ytr[:, c], yte[:, c]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if len(np.unique(a)) == 2 and len(np.unique(b)) == 2:
            cols.append(c)
    return cols


def linear_probe_scores(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, groups: np.ndarray | None = None,
                        seed: int = 0, n_jobs: int = 1) -> np.ndarray:
    """Test logits [n_test, C] of the statistics layer's logistic probe (`chexfound.stats.fit_probe`: C chosen
    by cross-validation on the train rows, patient folds when `groups` holds the train patient ids)."""
    return fit_probe(ftr, ytr, groups=groups, seed=seed, n_jobs=n_jobs).decision_function(fte)


def mean_auroc(scores: np.ndarray, yte: np.ndarray, cols: list[int]) -> float:
    """Mean AUROC over `cols` (NaN labels and scores masked): the statistics layer's macro AUROC."""
    return macro_auroc(yte[:, cols], scores[:, cols]) if cols else float("nan")


def evaluate_features(ftr: np.ndarray, fte: np.ndarray, task: ProbeTask, knn_k: int = 20,
                      linear: bool = True) -> dict[str, float]:
    cols = _columns(task.train_labels, task.test_labels)
    res = {"knn_auroc": mean_auroc(knn_scores(ftr, task.train_labels, fte, knn_k), task.test_labels, cols)}
    if linear:
        s = linear_probe_scores(ftr, task.train_labels, fte, task.train_groups)
        res["linear_auroc"] = mean_auroc(s, task.test_labels, cols)
    return res


def probe_backbone(model: VisionTransformer, task: ProbeTask, device: torch.device, knn_k: int = 20,
                   batch_size: int = 64, linear: bool = True,
                   autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    ftr = backbone_features(model, task.train_images, device, batch_size, autocast)
    fte = backbone_features(model, task.test_images, device, batch_size, autocast)
    return evaluate_features(ftr, fte, task, knn_k, linear)


def task_columns(task: ProbeTask) -> list[int]:
    return _columns(task.train_labels, task.test_labels)


# -- the final comparison's models, in the order it reports them --------------------------------------------
TEACHER, INIT, PIXELS = "teacher", "init (iteration 0)", "pixels_32x32"


def random_init(k: int) -> str:
    """The name of the k-th random-init baseline (seeded 10000 + k)."""
    return f"random_init_seed{k}"


def probe_comparison(task: ProbeTask, scores: dict[str, np.ndarray], seed: int) -> Comparison:
    """The statistics layer's comparison of the final probes' test logits on `task`: AUROC with a patient-
    bootstrap CI per model (teacher, init, random inits by seed, pixels) and the paired differences
    teacher - each baseline (model - reference) on the same resamples."""
    cols = task_columns(task)
    randoms = sorted((k for k in scores if k.startswith("random_init")), key=lambda k: int(k.rsplit("seed", 1)[1]))
    ordered = {k: scores[k][:, cols] for k in [TEACHER, INIT, *randoms, PIXELS] if k in scores}
    y = task.test_labels[:, cols]
    comp = compare_scores(y, ordered, [task.label_names[c] for c in cols], task.test_groups,
                          cfg=BootstrapConfig(seed=seed), pairs=[(TEACHER, k) for k in ordered if k != TEACHER])
    comp.extra = {"n_train": int(len(task.train_labels)), "n_test": int(len(y)),
                  "probe": "chexfound.stats logistic probe (C by 3-fold patient cross-validation)"}
    return comp


# -- where the probe sets are, and their sizes (from the labels alone) --------------------------------
def _is_kermany(folder: Path) -> bool:
    f = folder / "labels.csv"
    if not f.is_file():
        return False
    head = f.read_text().splitlines()[:2]
    return len(head) == 2 and "label" in head[0].split(",") and ("NORMAL" in head[1] or "PNEUMONIA" in head[1])


def _probes_off(v: Any) -> bool:
    return v in (None, False, "none", "off")


def probes_off_reason(cfg: dict[str, Any]) -> str:
    """Why `resolve_kermany` found no probe set: switched off by the setting, or searched for and not found."""
    v = cfg["probe"]["kermany"]
    if _probes_off(v):
        return f"probes are off (probe.kermany={v})"
    return "no Kermany folder found (data.sources, $CHEXFOUND_DATA/kermany); probes are off"


def resolve_kermany(cfg: dict[str, Any]) -> Path | None:
    """The Kermany folder the probes use: `probe.kermany` as given, or ("auto") the first data source or
    $CHEXFOUND_DATA/kermany that is one; None when probes are off or none is found (`probes_off_reason`)."""
    v = cfg["probe"]["kermany"]
    if _probes_off(v):
        return None
    if v != "auto":
        p = expand_path(v)
        if not _is_kermany(p):
            raise FileNotFoundError(f"probe.kermany: {p} is not a Kermany folder (labels.csv with label column)")
        return p
    for s in cfg["data"]["sources"]:
        p = expand_path(s["path"] if isinstance(s, dict) else s)
        if p.is_dir() and _is_kermany(p):
            return p
    p = expand_path("${CHEXFOUND_DATA}/kermany")
    return p if _is_kermany(p) else None


def split_sizes(kind: str, root: Path) -> tuple[int, int, int]:
    """(train images, test images, findings with both classes in each) of a probe task, from its labels alone
    (no image is decoded): the splits `kermany_task` / `nih14_task` draw from."""
    if kind == "kermany":
        m = read_kermany(root)
        return len(m.split("train")), len(m.split("test")), 1
    m = read_manifest(Path(root) / "labels.csv")
    m.label_columns = [c for c in m.label_columns if c not in NIH_EXCLUDE and c != "no_finding"]
    split = patient_split(m.patients(), [0.7, 0.3], ["dev", "test"], 0)
    y = m.labels()

    def both(rows: np.ndarray, c: int) -> bool:
        v = y[rows, c]
        return len(np.unique(v[~np.isnan(v)])) == 2

    n_f = sum(both(split == "dev", c) and both(split == "test", c) for c in range(y.shape[1]))
    return int((split == "dev").sum()), int((split == "test").sum()), int(n_f)
