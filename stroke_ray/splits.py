"""Which subjects train and which validate: the hold-out split and k-fold splits.

Subjects are ranked by a hash of (seed, subject id), so the splits are deterministic and do
not depend on the order the ids come in.

* `split_subjects`: the lowest-ranked `round(val_fraction * n)` subjects validate. A
  subject's rank does not depend on the others, so adding subjects moves few of them.
* `fold_splits`: the ranked subjects are dealt round-robin into k folds: disjoint, together
  every subject, sizes differing by at most one (balance over stability: a new subject
  shifts the later ranks to the next fold). Fold i validates on the i-th list and trains
  on the rest, so across the k folds every subject is validated exactly once, by the one
  model that did not train on it (its out-of-fold prediction).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from stroke_ray.config import DataConfig

__all__ = [
    "fold_splits",
    "split_manifest",
    "split_subjects",
    "subject_key",
    "train_val_subjects",
    "validation_subjects",
]


def subject_key(subject: str, seed: int) -> int:
    """The subject's rank key for `seed`: 64 bits of blake2b("<seed>:<subject>")."""
    digest = hashlib.blake2b(f"{seed}:{subject}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _ranked(subjects: Sequence[str], seed: int, caller: str) -> list[str]:
    unique = sorted(set(subjects))
    if len(unique) != len(subjects):
        raise ValueError(f"{caller}: subject ids must be unique")
    return sorted(unique, key=lambda s: (subject_key(s, seed), s))


def split_subjects(
    subjects: list[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic, disjoint train/validation split (both returned sorted).

    Subjects are ranked by a hash of (seed, subject id) and the lowest-ranked
    round(val_fraction * n) go to validation (at least one of each when n >= 2). A subject's
    rank does not depend on the others, so adding subjects moves few of the existing ones.

    Raises:
        ValueError: duplicate ids, or val_fraction outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ranked = _ranked(subjects, seed, "split_subjects")
    n = len(ranked)
    if n < 2:
        return ranked, []
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def fold_splits(subjects: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """The validation subjects of each of `k` folds (each list sorted).

    Args:
        subjects: unique subject ids.
        k: number of folds, 2 <= k <= len(subjects).
        seed: the split seed (`data.split_seed`).

    Raises:
        ValueError: duplicate ids, or k outside [2, len(subjects)].
    """
    ranked = _ranked(subjects, seed, "fold_splits")
    if not 2 <= k <= len(ranked):
        raise ValueError(f"{k} folds need 2 <= k <= the number of subjects ({len(ranked)})")
    return [sorted(ranked[i::k]) for i in range(k)]


def train_val_subjects(subjects: Sequence[str], data: DataConfig) -> tuple[list[str], list[str]]:
    """(train, validation) subjects of a run: fold `data.fold` of `data.num_folds`, or the
    `data.val_fraction` hold-out split when no fold is set.

    Raises:
        ValueError: more folds than subjects, or duplicate ids.
    """
    if data.fold is None:
        return split_subjects(list(subjects), data.val_fraction, data.split_seed)
    val = fold_splits(subjects, data.num_folds, data.split_seed)[data.fold]
    held = set(val)
    return sorted(s for s in subjects if s not in held), val


def validation_subjects(
    subjects: list[str], val_fraction: float, seed: int, max_subjects: int | None = None
) -> list[str]:
    """The subjects a run validates on (and its val_* metrics describe): the split's
    validation side, the first `max_subjects` of it when capped."""
    _, val = split_subjects(subjects, val_fraction, seed)
    return val if max_subjects is None else val[:max_subjects]


def split_manifest(train: list[str], val: list[str], seed: int | None = None) -> dict:
    """A JSON-able record of a split, for the run's tracking (params/artifacts)."""
    digest = hashlib.sha256(
        ("train:" + ",".join(sorted(train)) + ";val:" + ",".join(sorted(val))).encode()
    ).hexdigest()
    manifest = {
        "method": "blake2b(seed:subject) rank",
        "num_train": len(train),
        "num_val": len(val),
        "train": sorted(train),
        "val": sorted(val),
        "sha256": digest,
    }
    if seed is not None:
        manifest["seed"] = int(seed)
    return manifest
