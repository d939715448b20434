"""The probe sets of a pretraining run: where the tasks are (`probe.kermany`, `probe.nih14`), their sizes from
the labels alone, and their images, decoded once, when first needed (a set a time budget turns down is never
decoded). A set is a seeded random subset of a task's train and test splits, so a smaller set of a task is a
subset of a larger one."""

from __future__ import annotations

from typing import Any

from chexfound.ssl.config import expand_path
from chexfound.ssl.probe import ProbeTask, kermany_task, nih14_task, resolve_kermany, split_sizes
from chexfound.ssl.probe_plan import PERIODIC, FinalSet, set_key


class ProbeSets:
    """The probe sets the `probe` section of a run's config names; `kermany` is None when probes are off."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.p = cfg["probe"]
        self.size = int(cfg["crops"]["global_crops_size"])
        self.seed = int(cfg["train"]["seed"])
        self.workers = int(cfg["data"]["num_workers"])
        self.kermany = resolve_kermany(cfg)
        self.nih14 = expand_path(self.p["nih14"]) if self.p.get("nih14") and self.kermany is not None else None
        self._sets: dict[str, ProbeTask] = {}  # decoded, by set_key
        self._periodic: tuple[int, int] | None = None

    def get(self, task: str, n_train: int, n_test: int) -> ProbeTask:
        """The set of `task` ("kermany", "nih14", or PERIODIC: Kermany's periodic set) with n_train + n_test
        images, decoded when first asked for."""
        key = set_key(task, n_train, n_test)
        if key not in self._sets:
            if task in ("kermany", PERIODIC):
                t = kermany_task(self.kermany, self.size, n_train, n_test, seed=self.seed, workers=self.workers)
            else:  # NIH-14's patient split is fixed (seed 0): the one a pretraining source can hold out
                t = nih14_task(self.nih14, self.size, n_train, n_test, seed=0, workers=self.workers)
            self._sets[key] = t
        return self._sets[key]

    @property
    def decoded(self) -> set[str]:
        """The keys (`set_key`) of the sets decoded so far."""
        return set(self._sets)

    def periodic_sizes(self) -> tuple[int, int]:
        """(train, test) images of the periodic set: probe.n_train / n_test, capped by Kermany's splits."""
        if self._periodic is None:
            n_tr, n_te, _ = split_sizes("kermany", self.kermany)  # type: ignore[arg-type]
            self._periodic = (min(int(self.p["n_train"]), n_tr), min(int(self.p["n_test"]), n_te))
        return self._periodic

    def final_sets(self) -> list[FinalSet]:
        """The final comparison's sets: probe.final_n_train / final_n_test cap every task (NIH-14 would take
        all its patients)."""
        cap_tr, cap_te = int(self.p["final_n_train"]), int(self.p["final_n_test"])
        finals = []
        for name, root in (("kermany", self.kermany), ("nih14", self.nih14)):
            if root is not None:
                n_tr, n_te, n_f = split_sizes(name, root)
                finals.append(FinalSet(name, min(cap_tr, n_tr), min(cap_te, n_te), n_f))
        return finals
