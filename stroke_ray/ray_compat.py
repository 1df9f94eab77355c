"""Every use of a Ray private API, in one place, for the one Ray version it was written for.

Ray's public API cannot do a few things stroke-ray needs:

- resuming a sweep that was stopped early: Tune restores the search's "finished" flag and
  the stop conditions of the interrupted session, so a resumed sweep would never start its
  missing trials (`reopen_search`, `set_stop_conditions`);
- removing the placement groups of Ray Train runs whose trial Tune stopped, on a Ray without
  the dashboard's state API (`release_orphaned_train_groups`);
- reading the checkpoint path that `TuneReportCallback` adds to each result
  (`checkpoint_path_key`) and Tune's per-trial state file (`tune_trial_states`);
- validating cluster.yaml as `ray up` does (`validate_cluster_config`);
- running the request guard inside Serve's HTTP proxy, before it buffers a body: the
  environment variable naming a function that returns the proxy's middlewares
  (`SERVE_PROXY_CALLBACK_ENV`), and the request headers with which a client can switch off
  the proxy's request timeout (`SERVE_CLIENT_CONTROL_HEADERS`, dropped by the guard).

Each of these relies on names or file formats that Ray may change in any release, so Ray is
pinned to `PINNED_RAY_VERSION` in pyproject.toml and tests/test_ray_compat.py fails, naming
the API, when the installed Ray is another version or an attribute used here is gone.
`RELIED_ON` lists them for that test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stroke_ray.locations import join, list_names, read_bytes, size_of, write_bytes

__all__ = [
    "PINNED_RAY_VERSION",
    "RELIED_ON",
    "SEARCH_STATE_KEYS",
    "SERVE_CLIENT_CONTROL_HEADERS",
    "SERVE_PROXY_CALLBACK_ENV",
    "TUNER_ATTRIBUTES",
    "checkpoint_path_key",
    "release_orphaned_train_groups",
    "reopen_search",
    "set_stop_conditions",
    "tune_trial_states",
    "validate_cluster_config",
]

PINNED_RAY_VERSION = "2.60.0"

# (module, dotted attribute) of every Ray name used here that is not public API; the test
# imports each. Attributes of objects Ray builds at run time are checked on real objects.
RELIED_ON = (
    ("ray._raylet", "PlacementGroupID"),
    ("ray.util.placement_group", "PlacementGroup"),
    ("ray.util.placement_group", "placement_group_table"),
    ("ray.util.placement_group", "remove_placement_group"),
    ("ray.tune.integration.ray_train", "CHECKPOINT_PATH_KEY"),
    ("ray.tune.impl.tuner_internal", "TunerInternal.get_run_config"),
    ("ray.autoscaler._private.util", "prepare_config"),
    ("ray.autoscaler._private.util", "validate_config"),
    ("ray.serve._private.constants", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"),
    ("ray.serve._private.constants", "SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER"),
    ("ray.serve._private.constants", "SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER"),
)
# Serve's proxy calls the function this variable names (module:function) when its process
# starts and wraps itself in the Starlette middlewares it returns (http_guard).
SERVE_PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# Request headers Ray 2.60's proxy obeys from any client: a timeout override (0 switches the
# request timeout off) and "do not watch for the client's disconnect".
SERVE_CLIENT_CONTROL_HEADERS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")
# Instance attributes of a local (non-client) Tuner that `set_stop_conditions` writes.
TUNER_ATTRIBUTES = ("_local_tuner", "_local_tuner._tune_config.time_budget_s")
# Keys of Tune's search-generator state that `reopen_search` edits.
SEARCH_STATE_KEYS = ("total_samples", "finished")


def checkpoint_path_key() -> str:
    """The result key under which `TuneReportCallback` reports a Train checkpoint's path."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    return CHECKPOINT_PATH_KEY


def _newest(sweep_dir: str | Path, prefix: str) -> str | None:
    """The newest of Tune's `<prefix>*.json` state files in the sweep folder (local or URL)."""
    names = [n for n in list_names(sweep_dir) if n.startswith(prefix) and n.endswith(".json")]
    return join(sweep_dir, max(names)) if names else None


def tune_trial_states(sweep_dir: str | Path) -> dict[str, tuple[str, bool]]:
    """trial id -> (status, reported anything) from Tune's newest experiment state file."""
    newest = _newest(sweep_dir, "experiment_state-")
    if newest is None:
        return {}
    out = {}
    for entry in json.loads(read_bytes(newest)).get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        size = size_of(join(sweep_dir, str(trial.get("relative_logdir", "")), "result.json"))
        out[trial.get("trial_id")] = (trial.get("status"), bool(size))
    return out


def reopen_search(sweep_dir: str | Path, num_samples: int) -> None:
    """Let a restored search generate the trials an interrupted session did not start.

    Tune marks its search as finished when a session is stopped early (stopper, time
    budget), and restores that flag, so a resumed sweep would never create its missing
    trials. The flag is cleared (and the total raised when `num_samples` asks for more) in
    Tune's newest search-generator state file, written the way Tune writes it (whole or not
    at all, locally or on the object store holding the sweep).

    Args:
        sweep_dir: the sweep's Tune experiment folder (`<storage>/<name>`), a path or a URL.
        num_samples: the number of trials the resumed sweep should reach.
    """
    from ray import cloudpickle

    path = _newest(sweep_dir, "search_gen_state-")
    if path is None:
        return
    state = cloudpickle.loads(read_bytes(path))
    trials = tune_trial_states(sweep_dir)
    # A trial the stopped session had only just launched is TERMINATED with no result and
    # Tune will not run it again: the search makes a replacement for each.
    never_ran = sum(1 for status, reported in trials.values() if status == "TERMINATED" and not reported)
    total = max(int(state.get("total_samples", 0)), num_samples + never_ran)
    state["total_samples"] = total
    state["finished"] = False
    # The concurrency limiter may still count a trial that finished as the session stopped
    # (it never heard of its completion); restored, it would block every new trial.
    limiter = state.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict) and "live_trials" in limiter:
        unfinished = {t for t, (status, _) in trials.items() if status != "TERMINATED"}
        limiter["live_trials"] = {t for t in limiter["live_trials"] if t in unfinished}
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    write_bytes(path, cloudpickle.dumps(state))


def set_stop_conditions(tuner, stopper, time_budget_s: float | None, callbacks: list) -> None:
    """Give a restored Tuner this session's stop conditions and callbacks.

    Tune restores the stopper, time budget and callbacks pickled with the interrupted
    session, which would end the resumed session at the same point again (and report to the
    old session's objects); the public API has no setter.
    """
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:  # Ray client mode: keep Tune's restored settings
        return
    internal.get_run_config().stop = stopper
    internal.get_run_config().callbacks = list(callbacks)
    internal._tune_config.time_budget_s = time_budget_s


def release_orphaned_train_groups(keep_bundle: dict[str, float]) -> int:
    """Remove this job's live placement groups except those of one bundle `keep_bundle`.

    A Ray Train run inside a Tune trial that Tune stopped leaves its worker group's
    placement group behind (the controller that owned it is gone). Ray Train's own cleaner
    finds such groups through the dashboard's state API; on a Ray without a dashboard they
    would keep their CPUs until the process exits. Call only when no trial of this job is
    running. `keep_bundle` is the resource bundle of Tune's own trial groups, which Tune
    manages itself. Returns how many groups were removed.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, info in placement_group_table().items():
        if not pg_id.endswith(job) or info.get("state") not in ("CREATED", "PENDING", "RESCHEDULING"):
            continue
        if list(info.get("bundles", {}).values()) == [dict(keep_bundle)]:
            continue
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        removed += 1
    return removed


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a cluster YAML before it contacts the cloud: fill defaults, validate.

    Returns the prepared config; raises jsonschema.ValidationError on a bad field.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
