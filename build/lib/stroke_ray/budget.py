"""A training time budget: wall-clock seconds, or the training process's CPU seconds.

`TrainConfig.time_budget_s` ends training at the first epoch boundary after the budget is
spent (`epochs` stays an upper bound), and the learning-rate schedule runs on the spent
fraction of the budget, so a budgeted run still anneals to its end. The "process" clock
counts the CPU seconds of the training process (all its threads): on a machine shared with
other work it gives every run the same compute, whatever the load, which is what the
accuracy benchmark compares recipes with.
"""

from __future__ import annotations

import time
from typing import Literal

__all__ = ["TrainingBudget", "BudgetClock"]

BudgetClock = Literal["wall", "process"]


class TrainingBudget:
    """Seconds spent against a budget, carried across resumes by `already_spent`."""

    def __init__(self, seconds: float | None, clock: BudgetClock = "wall", already_spent: float = 0.0):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a time budget must be positive, got {seconds}")
        if clock not in ("wall", "process"):
            raise ValueError(f"budget clock must be 'wall' or 'process', got {clock!r}")
        self.seconds = seconds
        self._now = time.perf_counter if clock == "wall" else time.process_time
        self._start = self._now()
        self._before = float(already_spent)

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def spent(self) -> float:
        """Seconds spent so far, including those of earlier (resumed) sessions."""
        return self._before + self._now() - self._start

    def fraction(self) -> float | None:
        """Share of the budget spent, in [0, 1]; None without a budget."""
        if self.seconds is None:
            return None
        return min(1.0, self.spent() / self.seconds)

    def exhausted(self) -> bool:
        return self.seconds is not None and self.spent() >= self.seconds
