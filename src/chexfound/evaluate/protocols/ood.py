"""Protocol (c): out-of-distribution: train a head on dataset A, test it on dataset B's mapped findings.

Findings are matched by name through `chexfound.data.findings.finding_map` (e.g. Kermany `PNEUMONIA` <- NIH
`Pneumonia`, CheXpert `Pleural Effusion` <- NIH `Effusion`). The head is trained and thresholded on A (train/val); B contributes
only its test rows. The in-distribution score on A's test rows is reported beside it, on the same findings,
so the drop is visible.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from chexfound.errors import ChexfoundError
from chexfound.data.findings import finding_map as map_findings
from chexfound.evaluate.protocols.common import EvalConfig, Splits, score_predictions
from chexfound.evaluate.trainers import HeadTrainer


def run_ood(
    trainer: HeadTrainer,
    source_a: Any, y_a: np.ndarray, patients_a: Sequence[Any] | np.ndarray, splits_a: Splits,
    findings_a: Sequence[str],
    source_b: Any, y_b: np.ndarray, patients_b: Sequence[Any] | np.ndarray, test_b: np.ndarray,
    findings_b: Sequence[str],
    cfg: EvalConfig = EvalConfig(),
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> tuple[dict[str, Any], dict[str, Any]]:
    mapping = map_findings(findings_a, findings_b)
    if not mapping:
        raise ChexfoundError(f"no shared findings between {names[0]} {list(findings_a)} and "
                             f"{names[1]} {list(findings_b)}")
    ya = np.asarray(y_a, dtype=np.float64)
    yb = np.asarray(y_b, dtype=np.float64)
    ya = ya[:, None] if ya.ndim == 1 else ya
    yb = yb[:, None] if yb.ndim == 1 else yb
    src_cols = [list(findings_a).index(f) for f in mapping]
    dst_cols = [list(findings_b).index(mapping[f]) for f in mapping]
    shared = [mapping[f] for f in mapping]  # reported under B's names
    model = trainer.fit(source_a, ya, splits_a.train, splits_a.val, seed)
    thr = np.asarray(model.thresholds)[src_cols]
    pb = model.predict(source_b, np.asarray(test_b))[:, src_cols]
    pa = model.predict(source_a, splits_a.test)[:, src_cols]
    pats_b = np.asarray(patients_b).astype(str)
    pats_a = np.asarray(patients_a).astype(str)
    y_train_named = ya[splits_a.train][:, src_cols]
    ood = score_predictions(yb[np.asarray(test_b)][:, dst_cols], pb, pats_b[np.asarray(test_b)], shared, thr,
                            y_train_named, cfg)
    iid = score_predictions(ya[splits_a.test][:, src_cols], pa, pats_a[splits_a.test], shared, thr,
                            y_train_named, cfg)
    core = {k: ood[k] for k in ("macro", "micro", "per_finding", "eligible", "excluded", "rule")}
    for k in ("groups", "group_rule", "bootstrap"):
        if k in ood:
            core[k] = ood[k]
    metrics = {"protocol": "ood", "train_dataset": names[0], "test_dataset": names[1],
               "mapping": {a: b for a, b in mapping.items()}, **core, "in_distribution": iid,
               "head": model.info}
    return metrics, {"predictions": {f"{names[1]} (OOD)": pb, f"{names[0]} (ID)": pa},
                     "y_test": yb[np.asarray(test_b)][:, dst_cols], "y_test_id": ya[splits_a.test][:, src_cols],
                     "findings": shared}
