"""Connecting to Ray: a local instance by default, a running cluster when given an address."""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Initialise Ray once per process.

    `address` (or the RAY_ADDRESS environment variable) joins an existing cluster, e.g.
    "auto" on a cluster node or "ray://head:10001" from outside. Without one, a local Ray
    starts with `num_cpus` CPUs (all by default) and no dashboard, which keeps start-up
    short on a laptop.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local" always starts a fresh instance; without it Ray would attach to
        # whatever cluster another process on this machine happens to be running.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
