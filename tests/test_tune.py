"""A real sweep on local Ray with a sqlite MLflow store: interrupted, resumed, registered."""

from __future__ import annotations

import time

import pytest
from ray import tune

from stroke_ray.config import TrainConfig
from stroke_ray.errors import StrokeRayError
from stroke_ray.resources import search_space_file
from stroke_ray.tracking import TAG_TRIAL
from stroke_ray.tune import run_sweep
from stroke_ray.tune_trial import trial_concurrency

# Ray Train / Tune / Serve: the whole module is in the slow suite.
pytestmark = pytest.mark.slow

SMOKE = search_space_file("smoke")


class StopAfterFirstTrial(tune.Stopper):
    """Ends the whole sweep once one trial has run all its epochs (an interruption).

    Tune pickles the stopper with the sweep and restores it on resume; `armed` is a class
    attribute (not pickled) so the interruption happens once, as a real one would.
    """

    armed = True

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.finished = False

    def __call__(self, trial_id, result) -> bool:
        self.finished |= result["training_iteration"] >= self.epochs
        return False

    def stop_all(self) -> bool:
        return self.finished and StopAfterFirstTrial.armed


def test_concurrency_leaves_room_for_the_drivers():
    cfg = TrainConfig()
    assert trial_concurrency(cfg, {"CPU": 2.0}) == 1  # 2 x (1 + 0.01) > 2: one at a time
    assert trial_concurrency(cfg, {"CPU": 8.0}) == 7
    assert trial_concurrency(cfg.model_copy(update={"num_workers": 2}), {"CPU": 8.0}) == 3
    assert trial_concurrency(cfg, {"CPU": 0.5}) == 1
    assert trial_concurrency(cfg, {"CPU": 8.0, "GPU": 2.0}) == 2


@pytest.fixture(scope="module")
def sweep(synth_store, ray_local, tmp_path_factory):
    """Session 1 stops after one finished trial; session 2 resumes to both."""
    from stroke_ray.search_space import SearchSpace

    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = TrainConfig.from_dict({
        "data": {"store": synth_store, "level": "32"}, "experiment": "sweep-test",
        "steps_per_epoch": 3, "batch_size": 1, "val_max_subjects": 1,
    })
    space = SearchSpace.load(SMOKE)
    kwargs = dict(space_file=SMOKE, base_config=base, name="smoke", storage_path=str(root / "runs"),
                  tracking_uri=uri, num_samples=2, seed=0, verbose=0)
    first = run_sweep(**kwargs, stopper=StopAfterFirstTrial(space.max_epochs))
    StopAfterFirstTrial.armed = False
    resumed_at = time.time()
    second = run_sweep(**kwargs, resume=True)
    return dict(first=first, second=second, uri=uri, root=root, resumed_at=resumed_at, base=base, kwargs=kwargs)


def _client(uri):
    from stroke_ray.tracking import client_for

    return client_for(uri)


def test_interrupted_sweep_resumes_without_repeating(sweep):
    first, second = sweep["first"], sweep["second"]
    done_first = [t for t in first.trials if t.metric is not None]
    assert len(done_first) == 1
    # A trial the stopper caught while starting is listed as NOT RUN and replaced.
    ran = [t for t in second.trials if t.status != "NOT RUN"]
    assert len(ran) == 2 and len(second.trials) <= 3
    assert len({t.trial_id for t in second.trials}) == len(second.trials)
    assert {t.trial_id for t in done_first} <= {t.trial_id for t in ran}
    assert all(t.status == "TERMINATED" and t.metric is not None and t.epochs >= 1 for t in ran)

    client = _client(sweep["uri"])
    for t in done_first:  # its MLflow run was not touched again by the resumed session
        run = client.search_runs(
            [client.get_experiment_by_name("sweep-test").experiment_id],
            filter_string=f"tags.`{TAG_TRIAL}` = '{t.trial_id}'",
        )
        assert len(run) == 1
        assert run[0].info.status == "FINISHED"
        assert run[0].info.end_time / 1000 < sweep["resumed_at"]
        history = client.get_metric_history(run[0].info.run_id, "epoch")
        assert sorted(m.step for m in history) == list(range(t.epochs))


def test_one_parent_run_with_one_nested_run_per_trial(sweep):
    client = _client(sweep["uri"])
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [sweep["second"].parent_run_id]
    assert sweep["first"].parent_run_id == sweep["second"].parent_run_id
    ran = {t.trial_id: t for t in sweep["second"].trials if t.status != "NOT RUN"}
    trained = [c for c in children if "val_dice" in c.data.metrics]
    assert len(trained) == len(ran) == 2  # one nested run per trial, none duplicated
    assert len({c.data.tags[TAG_TRIAL] for c in children}) == len(children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags[TAG_TRIAL] for c in trained} == set(ran)
    for child, trial in ((c, ran[c.data.tags[TAG_TRIAL]]) for c in trained):
        params = child.data.params
        assert params["search.model.architecture"] == trial.params["model.architecture"]
        assert params["data.level"] == "32" and params["steps_per_epoch"] == "3"
        assert "val_dice" in child.data.metrics
    assert parents[0].data.params["space"] == "smoke"
    assert parents[0].info.status == "FINISHED"
    assert "report.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    figures = {a.path for a in client.list_artifacts(parents[0].info.run_id, "figures")}
    assert figures == {"figures/parallel_coordinates.png", "figures/param_importances.png", "figures/learning_curves.png"}


def test_best_model_exported_and_registered_as_champion(sweep):
    from stroke_ray.checkpoint import load_checkpoint
    from stroke_ray.model_ref import CHAMPION_ALIAS, REGISTERED_MODEL, resolve_checkpoint

    result = sweep["second"]
    scored = [t for t in result.trials if t.metric is not None]
    top = max(t.metric for t in scored)
    best = min((t for t in scored if t.metric == top), key=lambda t: t.trial_id)  # ties: lowest id
    assert result.best.trial_id == best.trial_id
    assert result.best_checkpoint == result.path / "best" / "checkpoint.pt"
    loaded = load_checkpoint(result.best_checkpoint)
    assert loaded.config.model.architecture == best.params["model.architecture"]
    assert loaded.config.model.widths == best.params["model.widths"]
    assert loaded.config.data.patch_size == best.params["data.patch_size"]
    assert result.best_config == loaded.config.model_copy(update={"tracking_uri": result.best_config.tracking_uri})

    client = _client(sweep["uri"])
    version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    assert str(version.version) == result.model_version
    best_run = client.search_runs(
        [client.get_experiment_by_name("sweep-test").experiment_id],
        filter_string=f"tags.`{TAG_TRIAL}` = '{best.trial_id}'",
    )[0]
    assert version.run_id == best_run.info.run_id
    # Each session registers its best; a run is registered at most once, so the resumed session
    # adds a version only if its best trial differs from the first session's.
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    first_run = client.get_model_version(REGISTERED_MODEL, sweep["first"].model_version).run_id
    assert len({v.run_id for v in versions}) == len(versions)
    assert len(versions) == (1 if first_run == best_run.info.run_id else 2)
    fetched = resolve_checkpoint(f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}", sweep["uri"])
    assert fetched.read_bytes() == result.best_checkpoint.read_bytes()


def test_report_lists_trials_best_config_and_importances(sweep):
    result = sweep["second"]
    text = result.report_path.read_text()
    assert result.report_path == result.path / "report.md"
    for t in result.trials:
        assert f"| {t.trial_id} | {t.status} |" in text
    assert f"Trial {result.best.trial_id}: val_dice = {result.best.metric:.4f}" in text
    assert "architecture: " + result.best.params["model.architecture"] in text
    assert "## Parameter importances" in text
    if result.importances:
        assert abs(sum(result.importances.values()) - 1) < 1e-6
    assert (result.path / "best" / "config.yaml").exists()


def test_resuming_a_finished_sweep_registers_nothing_new(sweep):
    from stroke_ray.model_ref import CHAMPION_ALIAS, REGISTERED_MODEL

    client = _client(sweep["uri"])
    before = sorted(v.version for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'"))
    again = run_sweep(**sweep["kwargs"], resume=True)
    assert again.best.trial_id == sweep["second"].best.trial_id
    assert again.model_version == sweep["second"].model_version
    assert sorted(v.version for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")) == before
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version == int(again.model_version)


def test_store_without_a_searched_level_is_refused_before_any_trial(synth_store, tmp_path):
    from stroke_ray.errors import ConfigError

    base = TrainConfig.from_dict({"data": {"store": synth_store}})  # smoke trains on 64 by default
    with pytest.raises(ConfigError, match=r"data.level: '64' is not in the store .*levels: native, 32"):
        run_sweep(SMOKE, base, name="no-level", storage_path=str(tmp_path / "runs"),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", verbose=0)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_existing_sweep_needs_resume(sweep):
    with pytest.raises(StrokeRayError, match="already exists there; resume it"):
        run_sweep(**sweep["kwargs"])
