"""What the probes of a pretraining run are and what they cost: the plan (periodic probes, final comparison sets,
random-init baselines), the measured costs per image and per fit, and the turn-down order a time budget applies
when the configured probes do not fit (`chexfound.ssl.budget` decides when; this module says what).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class FinalSet:
    """The images of one final-probe task (what the plan may shrink)."""

    task: str
    n_train: int
    n_test: int
    n_findings: int


@dataclass
class ProbePlan:
    periodic: int  # periodic probes, the iteration-0 probe included
    periodic_train: int
    periodic_test: int
    finals: list[FinalSet] = field(default_factory=list)
    random_seeds: int = 0
    turned_down: list[str] = field(default_factory=list)

    def copy(self) -> ProbePlan:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbePlan:
        d = dict(d)
        d["finals"] = [FinalSet(**f) for f in d.get("finals", [])]
        return cls(**d)


def set_key(task: str, n_train: int, n_test: int) -> str:
    """How a decoded probe set is named (`decoded` arguments below)."""
    return f"{task}:{n_train}+{n_test}"


PERIODIC = "periodic"


@dataclass
class ProbeCosts:
    """Measured seconds (see the module docstring); zeros where nothing is run."""

    feature_s: float = 0.0  # per image per backbone
    fit_s: float = 0.0  # per (train image x feature x finding)
    decode_s: float = 0.0  # per probe image (each set is decoded once, when first needed)
    feature_dim: int = 0  # width of a backbone's probe features
    pixel_dim: int = 1024  # 32 x 32 pixels
    ckpt_s: float = 0.0  # one checkpoint during the run
    end_s: float = 0.0  # the final checkpoint and the exports

    def periodic_probe_s(self, plan: ProbePlan) -> float:
        if plan.periodic_train + plan.periodic_test == 0:
            return 0.0
        return (self.feature_s * (plan.periodic_train + plan.periodic_test)
                + self.fit_s * plan.periodic_train * self.feature_dim)

    def periodic_s(self, plan: ProbePlan, decoded: set[str] | frozenset[str] = frozenset()) -> float:
        """Every periodic probe of the plan, and decoding their set once."""
        if plan.periodic <= 0:
            return 0.0
        n = plan.periodic_train + plan.periodic_test
        decode = 0.0 if set_key(PERIODIC, plan.periodic_train, plan.periodic_test) in decoded else self.decode_s * n
        return plan.periodic * self.periodic_probe_s(plan) + decode

    def final_model_s(self, f: FinalSet) -> float:
        """One backbone on one final task: its features and its probe fits."""
        return self.feature_s * (f.n_train + f.n_test) + self.fit_s * f.n_train * self.feature_dim * f.n_findings

    def final_probes_s(self, plan: ProbePlan, done_sizes: dict[str, tuple[int, int]] | None = None,
                       decoded: set[str] | frozenset[str] = frozenset()) -> float:
        """teacher + iteration-0 weights + random inits on every task, the pixel fits not done yet, and
        decoding the sets not decoded yet."""
        total = 0.0
        for f in plan.finals:
            total += (2 + plan.random_seeds) * self.final_model_s(f)
            if (done_sizes or {}).get(f.task) != (f.n_train, f.n_test):
                total += self.fit_s * f.n_train * self.pixel_dim * f.n_findings
            if set_key(f.task, f.n_train, f.n_test) not in decoded:
                total += self.decode_s * (f.n_train + f.n_test)
        return total

    def reserve_s(self, plan: ProbePlan, done_sizes: dict[str, tuple[int, int]] | None = None,
                  decoded: set[str] | frozenset[str] = frozenset()) -> float:
        """Everything a plan keeps out of training: periodic probes, final probes, the end's exports."""
        return self.periodic_s(plan, decoded) + self.final_probes_s(plan, done_sizes, decoded) + self.end_s


STAGES = ("periodic", "final_sets", "random_seeds", "final_tasks")


def turn_down(plan: ProbePlan, cost: Callable[[ProbePlan], float], limit_s: float, min_final_images: int,
              stages: tuple[str, ...] = STAGES) -> ProbePlan:
    """The plan with its probes turned down (in `stages` order, see the module docstring) until
    `cost(plan) <= limit_s` or nothing is left to turn down; each step is noted in `turned_down`."""
    p = plan.copy()
    if "periodic" in stages:
        before = p.periodic
        while cost(p) > limit_s and p.periodic > 0:
            p.periodic //= 2
        if p.periodic != before:
            p.turned_down.append(f"periodic probes {before} -> {p.periodic}")
    if "final_sets" in stages:
        before_sets = {f.task: (f.n_train, f.n_test) for f in p.finals}
        while cost(p) > limit_s:
            shrunk = False
            for f in p.finals:
                for attr in ("n_train", "n_test"):
                    n = getattr(f, attr)
                    if n > min_final_images:
                        setattr(f, attr, max(min_final_images, n // 2))
                        shrunk = True
            if not shrunk:
                break
        for f in p.finals:
            a, b = before_sets[f.task]
            if (a, b) != (f.n_train, f.n_test):
                p.turned_down.append(f"final {f.task} set {a}+{b} -> {f.n_train}+{f.n_test} images (train+test)")
    if "random_seeds" in stages:
        before = p.random_seeds
        while cost(p) > limit_s and p.random_seeds > 1:
            p.random_seeds -= 1
        if p.random_seeds != before:
            p.turned_down.append(f"random-init baselines {before} -> {p.random_seeds}")
    if "final_tasks" in stages:
        while cost(p) > limit_s and p.finals:
            f = p.finals.pop()  # the last task first (NIH-14 before Kermany)
            p.turned_down.append(f"final {f.task} comparison dropped")
    return p


def plan_from_config(pcfg: dict[str, Any], finals: list[FinalSet], periodic_on: bool) -> ProbePlan:
    """The configured probes (before any turn-down)."""
    return ProbePlan(periodic=(int(pcfg["n_evals"]) + 1) if periodic_on else 0,
                     periodic_train=int(pcfg["n_train"]) if periodic_on else 0,
                     periodic_test=int(pcfg["n_test"]) if periodic_on else 0,
                     finals=finals, random_seeds=int(pcfg["final_random_seeds"]) if finals else 0)


def probe_iterations(total: int, n_evals: int, done: int = 0) -> set[int]:
    """Iterations of `n_evals` periodic probes spread evenly over (done, total) (neither end)."""
    rest = total - done
    return {done + int(round(rest * (k + 1) / (n_evals + 1))) for k in range(max(0, n_evals))} - {done, total}
