"""Promotion: a sweep's best model becomes the champion only when it is better.

`promote` registers a run's checkpoint with the score it was measured on (`HeldOutScore`,
recorded as registry tags on its version) and moves the champion alias only when that
score beats the current champion's on the same validation subjects (or when forced). The
registry itself (names, versions, aliases, downloads) is `model_ref`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from stroke_ray.errors import StrokeRayError
from stroke_ray.model_ref import (
    CHAMPION_ALIAS,
    CHAMPION_URI,
    REGISTERED_MODEL,
    register_run_version,
    resolve_checkpoint,
    version_uri,
)

__all__ = ["HeldOutScore", "Promotion", "promote"]

_HELD_OUT_TAGS = ("metric", "mode", "score", "subjects_sha256")
_TAG_PREFIX = "stroke_ray.heldout_"
# MLflow keeps tag values up to 5000 characters; longer subject lists keep only their digest.
_MAX_SUBJECTS_TAG = 4000


@dataclass(frozen=True)
class HeldOutScore:
    """A model's score on held-out subjects: what promotion compares.

    Attributes:
        metric: e.g. "val_dice"; mode: "max" or "min" (which way is better).
        score: the value of `metric` averaged over `subjects`.
        subjects: the validation subjects it was measured on.
        store: the store they were read from (informative).
    """

    metric: str
    mode: str
    score: float
    subjects: tuple[str, ...]
    store: str = ""

    @property
    def subjects_sha256(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.subjects)).encode()).hexdigest()

    def tags(self) -> dict[str, str]:
        """The registry tags that record it on a model version."""
        joined = ",".join(sorted(self.subjects))
        tags = {"metric": self.metric, "mode": self.mode, "score": repr(float(self.score)),
                "subjects_sha256": self.subjects_sha256, "num_subjects": str(len(self.subjects)),
                "store": self.store, "subjects": joined if len(joined) <= _MAX_SUBJECTS_TAG else ""}
        return {_TAG_PREFIX + k: v for k, v in tags.items()}

    @staticmethod
    def recorded(tags: Mapping[str, str]) -> dict[str, str] | None:
        """What a version's tags record (metric, mode, score, subjects_sha256), or None."""
        found = {k: tags.get(_TAG_PREFIX + k) for k in _HELD_OUT_TAGS}
        return found if all(found.values()) else None

    def better_than(self, other: float) -> bool:
        return self.score > other if self.mode == "max" else self.score < other


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: the challenger's version, whether it became the champion and why."""

    version: str
    promoted: bool
    reason: str
    champion: str | None = None  # the champion's version before
    champion_score: float | None = None  # on the challenger's subjects

    def line(self) -> str:
        if self.promoted:
            return f"registered: {CHAMPION_URI} (version {self.version}; {self.reason})"
        return (f"registered: {version_uri(self.version)}, not promoted ({self.reason}); "
                f"the champion stays version {self.champion}")


def promote(client, run_id: str, checkpoint: Path, held_out: HeldOutScore, *, force: bool = False,
            evaluate: Callable[[Path, HeldOutScore], float] | None = None) -> Promotion:
    """Register `run_id`'s checkpoint with its held-out score; make it the champion only when
    it beats the current champion on the same validation subjects (or `force`).

    The champion's score on the challenger's subjects is its recorded score when it was
    measured on exactly those subjects with the same metric, else `evaluate(champion
    checkpoint, held_out)` (evaluate.evaluate_checkpoint); without `evaluate`, or when it
    fails, the champion stays. A tie keeps the champion.

    Raises:
        MlflowException: the registry cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    version = register_run_version(client, run_id, checkpoint, held_out.tags())
    try:
        current = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    except MlflowException:  # no such alias (or no registered model) yet
        current = None

    def crown(reason: str, champion=None, champion_score=None) -> Promotion:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS, version)
        return Promotion(version, True, reason, champion, champion_score)

    if current is None:
        return crown("no champion before")
    champion = str(current.version)
    if champion == version:
        return Promotion(version, True, "already the champion", champion)
    if force:
        return crown("forced with --promote", champion)
    recorded = HeldOutScore.recorded(current.tags or {})
    same = recorded is not None and (recorded["metric"], recorded["mode"], recorded["subjects_sha256"]) == (
        held_out.metric, held_out.mode, held_out.subjects_sha256)
    if same:
        champion_score, how = float(recorded["score"]), "recorded"
    elif evaluate is None:
        return Promotion(version, False, "the champion was validated on other subjects and cannot be "
                                         "re-evaluated here", champion)
    else:
        try:
            champion_score = float(evaluate(resolve_checkpoint(version_uri(champion),
                                                               client.tracking_uri), held_out))
        except StrokeRayError as exc:
            return Promotion(version, False, f"the champion cannot be evaluated on these subjects: {exc}", champion)
        how = "evaluated on them"
    detail = (f"{held_out.metric} {held_out.score:.4f} vs the champion's {champion_score:.4f} ({how}) "
              f"on the same {len(held_out.subjects)} validation subjects")
    if held_out.better_than(champion_score):
        return crown(detail, champion, champion_score)
    return Promotion(version, False, detail, champion, champion_score)
