"""Ray private APIs: fail loudly, naming the API, when the installed Ray is not the pinned one.

stroke_ray/ray_compat.py holds every use of a Ray name that is not public API. When Ray is
upgraded these tests say which of them moved, before a sweep fails half-way through.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

from stroke_ray import ray_compat

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stroke_ray"


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_installed_ray_is_the_pinned_version():
    import ray

    assert ray.__version__ == ray_compat.PINNED_RAY_VERSION, (
        f"Ray {ray.__version__} is installed but stroke_ray/ray_compat.py was written for "
        f"Ray {ray_compat.PINNED_RAY_VERSION}: re-check every API in ray_compat.RELIED_ON, then update the pin"
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[tune,train,serve]=={ray_compat.PINNED_RAY_VERSION}" in pyproject


@pytest.mark.parametrize("module,attribute", ray_compat.RELIED_ON, ids=lambda x: str(x))
def test_private_api_still_exists(module, attribute):
    try:
        _resolve(module, attribute)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"Ray private API {module}.{attribute} is gone ({exc}); stroke_ray/ray_compat.py needs updating")


def test_local_tuner_has_the_attributes_set_stop_conditions_writes(tmp_path):
    from ray import tune

    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="probe", storage_path=str(tmp_path)))
    for dotted in ray_compat.TUNER_ATTRIBUTES:
        obj = tuner
        for part in dotted.split("."):
            assert hasattr(obj, part), f"Ray private API Tuner.{dotted} is gone; ray_compat.set_stop_conditions needs updating"
            obj = getattr(obj, part)
    run_config = tuner._local_tuner.get_run_config()
    assert hasattr(run_config, "stop") and hasattr(run_config, "callbacks")


def test_reopen_search_edits_the_state_file_tune_writes(tmp_path):
    """A real search-generator state file, as Tune saves it, is found, edited and re-read."""
    from ray import cloudpickle
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    generator = SearchGenerator(ConcurrencyLimiter(OptunaSearch(metric="val_dice", mode="max"), max_concurrent=1))
    generator.set_finished()
    generator.save_to_dir(str(tmp_path), session_str="probe")
    files = sorted(tmp_path.glob("search_gen_state-*.json"))
    assert files, "Ray no longer writes search_gen_state-*.json; ray_compat.reopen_search needs updating"
    with open(files[-1], "rb") as f:
        before = cloudpickle.load(f)
    for key in ray_compat.SEARCH_STATE_KEYS:
        assert key in before, f"Ray private state SearchGenerator[{key!r}] is gone; ray_compat.reopen_search needs updating"
    assert "live_trials" in before.get("name:ConcurrencyLimiter", {}), (
        "Ray private state ConcurrencyLimiter live_trials is gone; ray_compat.reopen_search needs updating"
    )
    assert before["finished"] is True

    ray_compat.reopen_search(tmp_path, num_samples=5)
    with open(files[-1], "rb") as f:
        after = cloudpickle.load(f)
    assert after["finished"] is False and after["total_samples"] == 5
    restored = SearchGenerator(ConcurrencyLimiter(OptunaSearch(metric="val_dice", mode="max"), max_concurrent=1))
    restored.restore_from_dir(str(tmp_path))
    assert not restored.is_finished() and restored._total_samples == 5


def test_serve_proxy_names_are_the_ones_ray_reads():
    from ray.serve._private import constants

    # The proxy reads this variable to install the request guard, and obeys these headers.
    assert constants.RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH is None or isinstance(
        constants.RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, str)
    source = Path(constants.__file__).read_text()
    assert f'"{ray_compat.SERVE_PROXY_CALLBACK_ENV}"' in source
    assert set(ray_compat.SERVE_CLIENT_CONTROL_HEADERS) == {
        constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER, constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER}


def test_only_ray_compat_uses_ray_private_apis():
    """`grep -rn "_local_tuner\\|_raylet" stroke_ray/` hits ray_compat.py alone."""
    out = subprocess.run(
        ["grep", "-rln", r"_local_tuner\|_raylet\|ray\.[a-z_.]*_private\|ray\.[a-z_.]*_internal", str(PACKAGE),
         "--include=*.py"],
        capture_output=True, text=True,
    ).stdout.split()
    assert [Path(p).name for p in out] == ["ray_compat.py"]
