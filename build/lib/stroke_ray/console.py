"""What a user sees while a stage runs: one progress view, with Ray's own output in a log file.

Ray Tune prints a trial table every few seconds and Ray Train a line per reported epoch of
every worker: hundreds of lines for a small sweep. During a sweep `ray_output_to` sends
everything Ray prints in this process (its trial tables, the worker logs it forwards, its
warnings) to a log file under the sweep's folder, while `SweepProgress` keeps one progress
line on the terminal: trials done and running, the best metric so far, and an ETA. The
commands' `--verbose` flag shows Ray's own output instead, as before.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ray import tune
from tqdm.auto import tqdm

__all__ = ["SweepProgress", "ray_output_to"]


@contextlib.contextmanager
def ray_output_to(log_path: Path | None) -> Iterator[TextIO | None]:
    """While active, Python-level stdout and stderr of this process go to `log_path` (appended).

    Ray's console logger writes to whatever `sys.stderr` is when it emits, and the worker
    logs Ray forwards to the driver are printed to `sys.stdout` / `sys.stderr` at that
    moment, so both land in the file. Does nothing when `log_path` is None.
    """
    if log_path is None:
        yield None
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1, encoding="utf-8") as fh:
        fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        try:
            yield fh
        finally:
            sys.stdout, sys.stderr = saved


class SweepProgress(tune.Callback):
    """One progress line for a sweep: trials done / total, running, best so far, ETA.

    Counts come from Tune's own trial list at every step, so a resumed sweep starts from
    the trials it already finished. Picklable (Tune saves its callbacks with the sweep):
    the bar is rebuilt after unpickling.
    """

    def __init__(self, name: str, total: int, metric: str, mode: str, stream: TextIO | None = None):
        self.name, self.total, self.metric, self.mode = name, int(total), metric, mode
        # The terminal as it is now: during the sweep sys.stderr points at the sweep log.
        self._stream = stream or sys.stderr
        self._bar = None
        self._postfix = None

    def __getstate__(self):
        return {**self.__dict__, "_bar": None, "_stream": None, "_postfix": None}

    def _progress(self):
        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=f"sweep {self.name}", unit="trial",
                             file=self._stream or sys.__stderr__, dynamic_ncols=True, leave=True)
        return self._bar

    def _best(self, trials) -> tuple[float, str] | None:
        pick = max if self.mode == "max" else min
        scored = []
        for t in trials:
            value = (getattr(t, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
            if value is not None and math.isfinite(value):
                scored.append((value, t.trial_id))
        return pick(scored) if scored else None

    def refresh(self, trials) -> None:
        """Redraw the line from Tune's trial list."""
        bar = self._progress()
        done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        running = sum(1 for t in trials if t.status == "RUNNING")
        if done > bar.n:
            bar.update(done - bar.n)
        best = self._best(trials)
        text = f"{running} running" + (f", best {self.metric} {best[0]:.4f} ({best[1]})" if best else "")
        if text != self._postfix:  # Tune calls this every loop step: redraw only on a change
            self._postfix = text
            bar.set_postfix_str(text, refresh=True)

    def on_step_end(self, iteration, trials, **info):
        self.refresh(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune's own per-report line goes to the sweep log (stdout is redirected there).
        epoch = result.get("training_iteration")
        value = result.get(self.metric)
        print(f"trial {trial.trial_id} epoch {epoch}: {self.metric} = {value}", flush=True)

    def on_experiment_end(self, trials, **info):
        self.refresh(trials)
        self._progress().close()
        self._bar, self._postfix = None, None
