"""The state a pretraining run carries from one process to the next: one typed object, saved in every checkpoint
(under "state") and read back in one place, `RunState.from_dict`, which reads both forms.

Form 2 (written now) has `"version": 2`, the health policy's state under "heal" (its collapse signal
included) and the budget's state under "budget" as the fields of `BudgetState`. Form 1 (checkpoints written
before) had no version, the collapse warning's counts under a separate "monitor" key, and the budget as a
plain dict with the same field names (or an empty one when the run had no time budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chexfound.ssl.budget import BudgetState
from chexfound.ssl.probe_plan import ProbePlan

VERSION = 2


@dataclass
class RunState:
    """How long the run trains, how long it has run, and the policies' own state."""

    total_iterations: int
    epoch_length: float
    elapsed_s: float = 0.0
    heal: dict[str, Any] = field(default_factory=dict)  # HealPolicy.state_dict()
    budget: BudgetState | None = None
    plan: ProbePlan | None = None  # the probe plan of a run without a budget is re-read from the config

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "total_iterations": self.total_iterations, "epoch_length": self.epoch_length,
                "elapsed_s": self.elapsed_s, "heal": self.heal,
                "budget": self.budget.to_dict() if self.budget is not None else {}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        """Either form (see the module docstring)."""
        heal = dict(d.get("heal") or {})
        if int(d.get("version", 1)) < 2 and "monitor" in d:  # form 1: the collapse warning stood apart
            heal.setdefault("collapse", d["monitor"])
        b = d.get("budget") or {}
        budget = BudgetState.from_dict(b)
        plan = budget.plan if budget is not None else (ProbePlan.from_dict(b["plan"]) if b.get("plan") else None)
        return cls(total_iterations=int(d["total_iterations"]), epoch_length=float(d["epoch_length"]),
                   elapsed_s=float(d.get("elapsed_s", 0.0)), heal=heal, budget=budget, plan=plan)
