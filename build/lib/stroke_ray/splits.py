"""Which subjects train and which validate: deterministic, id-based splits.

A subject's side depends only on a hash of (seed, subject id), never on the order or number
of the other ids, so adding subjects to a dataset moves few of the existing ones.
"""

from __future__ import annotations

import hashlib

__all__ = ["split_subjects", "split_manifest"]


def _subject_key(subject: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{subject}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_subjects(
    subjects: list[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic, disjoint train/validation split (both returned sorted).

    Subjects are ranked by a hash of (seed, subject id) and the lowest-ranked
    round(val_fraction * n) go to validation (at least one of each when n >= 2). A subject's
    rank does not depend on the others, so adding subjects moves few of the existing ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(subjects))
    if len(unique) != len(subjects):
        raise ValueError("split_subjects: subject ids must be unique")
    n = len(unique)
    if n < 2:
        return unique, []
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    ranked = sorted(unique, key=lambda s: (_subject_key(s, seed), s))
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return train, val


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
