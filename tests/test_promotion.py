"""Promotion: a new champion only when it beats the current one on the same held-out subjects."""

from __future__ import annotations

import pytest
from helpers import make_checkpoint

from stroke_ray import tracking
from stroke_ray.model_ref import CHAMPION_ALIAS, REGISTERED_MODEL
from stroke_ray.promotion import HeldOutScore, promote

# A fresh MLflow registry takes tens of seconds to create on a loaded machine.
pytestmark = pytest.mark.slow

SUBJECTS = ("sub-a", "sub-b", "sub-c")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite registry for the module (creating one costs seconds) and a checkpoint."""
    root = tmp_path_factory.mktemp("promotion")
    client = tracking.client_for(f"sqlite:///{root}/mlflow.db")
    return client, tracking.get_or_create_experiment(client, "promotion-tests"), make_checkpoint(root / "ckpt")


@pytest.fixture
def registry(store):
    """The registry with no champion: each test starts from there."""
    from mlflow.exceptions import MlflowException

    client, experiment, checkpoint = store
    try:
        client.delete_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
    except MlflowException:
        pass  # no registered model yet

    def challenger(score: float, subjects=SUBJECTS, **kw):
        run = client.create_run(experiment).info.run_id
        return promote(client, run, checkpoint, HeldOutScore("val_dice", "max", score, tuple(subjects), "s.zarr"), **kw)

    def champion() -> str:
        return str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version)

    return client, challenger, champion


def test_the_first_model_becomes_champion_with_its_record(registry):
    client, challenger, champion = registry
    first = challenger(0.5)
    assert first.promoted and first.reason == "no champion before" and champion() == first.version
    tags = client.get_model_version(REGISTERED_MODEL, first.version).tags
    assert float(tags["stroke_ray.heldout_score"]) == 0.5
    assert tags["stroke_ray.heldout_metric"] == "val_dice" and tags["stroke_ray.heldout_mode"] == "max"
    assert tags["stroke_ray.heldout_subjects"] == ",".join(SUBJECTS)
    assert tags["stroke_ray.heldout_subjects_sha256"] == HeldOutScore("val_dice", "max", 0, SUBJECTS).subjects_sha256
    assert "registered: models:/stroke-ray-segmenter@champion" in first.line()


def test_only_a_better_score_on_the_same_subjects_moves_the_alias(registry):
    _, challenger, champion = registry
    first = challenger(0.5)
    worse = challenger(0.4, subjects=tuple(reversed(SUBJECTS)))  # same subjects, other order
    assert not worse.promoted and champion() == first.version
    assert worse.champion_score == 0.5 and "recorded" in worse.reason
    assert "not promoted" in worse.line() and f"stays version {first.version}" in worse.line()
    tie = challenger(0.5)
    assert not tie.promoted and champion() == first.version
    better = challenger(0.6)
    assert better.promoted and champion() == better.version


def test_other_subjects_are_not_compared_by_their_recorded_scores(registry):
    _, challenger, champion = registry
    first = challenger(0.2)
    # A higher score on an easier set of subjects proves nothing: without a way to evaluate
    # the champion on them, it stays.
    other = challenger(0.9, subjects=("sub-x", "sub-y"))
    assert not other.promoted and champion() == first.version
    assert "other subjects" in other.reason


def test_promote_forces_it(registry):
    _, challenger, champion = registry
    challenger(0.5)
    forced = challenger(0.1, force=True)
    assert forced.promoted and champion() == forced.version and "--promote" in forced.reason


def test_re_registering_a_run_reuses_its_version(registry, store):
    client, _, champion = registry
    _, experiment, checkpoint = store
    run = client.create_run(experiment).info.run_id
    held = HeldOutScore("val_dice", "max", 0.3, SUBJECTS)
    first = promote(client, run, checkpoint, held)
    second = promote(client, run, checkpoint, held)
    assert second.version == first.version and second.reason == "already the champion"
    assert champion() == first.version


def test_the_champion_is_evaluated_on_the_challengers_subjects(synth_store, tmp_path):
    from stroke_ray.evaluate import evaluate_checkpoint
    from stroke_ray.splits import validation_subjects
    from stroke_ray.store import StrokeStore

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    experiment = tracking.get_or_create_experiment(client, "promotion-eval")
    subjects = tuple(validation_subjects(StrokeStore.open(synth_store).subjects(), 0.5, 0))
    # The champion predicts no lesion anywhere (every logit -5): Dice 0 on a case with a
    # lesion, 1 on one without. It was recorded on other subjects (with a higher score), so
    # only an evaluation on the challenger's subjects can compare the two.
    blind = make_checkpoint(tmp_path / "blind", bias=-5.0)
    run = client.create_run(experiment).info.run_id
    promote(client, run, blind, HeldOutScore("val_dice", "max", 0.99, ("sub-elsewhere",)))
    blind_score = evaluate_checkpoint(blind, synth_store, subjects, "val_dice")
    assert 0.0 <= blind_score < 1.0

    def evaluate(champion, on):
        return evaluate_checkpoint(champion, on.store, on.subjects, on.metric)

    challenger = make_checkpoint(tmp_path / "challenger")
    run = client.create_run(experiment).info.run_id
    beaten = promote(client, run, challenger, HeldOutScore("val_dice", "max", blind_score, subjects, synth_store),
                     evaluate=evaluate)
    assert not beaten.promoted and beaten.champion_score == blind_score and "evaluated" in beaten.reason
    run = client.create_run(experiment).info.run_id
    wins = promote(client, run, challenger, HeldOutScore("val_dice", "max", blind_score + 0.1, subjects, synth_store),
                   evaluate=evaluate)
    assert wins.promoted and "evaluated on them" in wins.reason
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version) == wins.version
