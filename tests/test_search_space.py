"""Search-space files: the shipped ones load and sample valid configs; bad ones fail clearly."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from stroke_ray.augment_config import AUGMENT_PRESETS
from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError
from stroke_ray.resources import search_space_file
from stroke_ray.search_space import SearchSpace, TrialResources
from stroke_ray.sweep_report import TrialSummary, param_importances

SPACES = Path(search_space_file("default")).parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


@pytest.mark.parametrize("name", ["default", "seed_replication", "smoke"])
def test_shipped_spaces_sample_valid_configs(name):
    space = SearchSpace.load(SPACES / f"{name}.yaml")
    assert space.name == name and space.metric == "val_dice" and space.mode == "max"
    for params in _sample(space, 30):
        cfg = space.trial_config(TrainConfig(), params)
        assert cfg.epochs == space.max_epochs
        for key, value in space.fixed.items():
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            assert obj == value, key


def test_condition_only_samples_when_parent_matches():
    # The default space's sampler settings are conditional on the sampler drawn.
    space = SearchSpace.load(SPACES / "default.yaml")
    base = TrainConfig()
    seen = {"lesion": set(), "foreground": set(), "threshold": set()}
    for params in _sample(space, 60):
        sampler = params["data.sampler"]
        assert ("data.foreground_fraction" in params) == (sampler in ("lesion", "foreground"))
        assert ("data.threshold" in params) == (sampler == "threshold")
        cfg = space.trial_config(base, params)
        seen[sampler].add((cfg.data.threshold, cfg.data.foreground_fraction))
        assert isinstance(cfg.model.widths, list) and len(cfg.model.widths) == 5
        assert cfg.data.level == "2mm" and cfg.data.patch in {(64, 64, 64), (80, 96, 80)}
    # An inactive parameter keeps the base config's value.
    assert {f for _, f in seen["threshold"]} == {base.data.foreground_fraction}
    assert {t for t, _ in seen["foreground"] | seen["lesion"]} == {base.data.threshold}
    assert all(len(values) > 1 for values in seen.values())


def test_seed_replication_ties_architecture_to_level():
    space = SearchSpace.load(SPACES / "seed_replication.yaml")
    cells = set()
    for params in _sample(space, 60):
        cfg = space.trial_config(TrainConfig(), params)
        expected = {"unet3d": "64", "unet2plus1d": "128"}[cfg.model.architecture]
        assert cfg.data.level == expected
        cells.add((cfg.model.architecture, cfg.loss, cfg.data.threshold))
    assert len(cells) == 8


def test_trial_config_keeps_base_values_not_searched():
    space = SearchSpace.load(SPACES / "smoke.yaml")
    base = TrainConfig.from_dict({"data": {"store": "/data/x.zarr"}, "experiment": "e", "seed": 7})
    cfg = space.trial_config(base, _sample(space, 1)[0])
    assert (cfg.data.store, cfg.experiment, cfg.seed) == ("/data/x.zarr", "e", 7)


VALID = {
    "name": "t",
    "parameters": {
        "model.architecture": {"choice": ["unet3d", "unet2plus1d"]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
    },
}


def _write(tmp_path, doc) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return path


def _with(param: str, spec) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(VALID, sort_keys=False))
    doc["parameters"][param] = spec
    return doc


BAD = [
    # (document, words the one-line message must contain)
    (_with("model.depth", {"choice": [3, 4]}), ["model.depth", "unknown parameter"]),
    (_with("model", {"choice": [1]}), ["model", "unknown parameter"]),
    (_with("optim.momentum", {"uniform": [0.1, 0.9]}), ["optim.momentum", "unknown parameter"]),
    (_with("optim.lr", {"normal": [0, 1]}), ["optim.lr", "unknown distribution type normal"]),
    (_with("data.threshold", {"uniform": [0.5, 0.1]}), ["data.threshold", "low (0.5) must be < high (0.1)"]),
    (_with("data.threshold", {"uniform": [0.3, 0.3]}), ["data.threshold", "must be < high"]),
    (_with("optim.lr", {"loguniform": [0.0, 0.1]}), ["optim.lr", "log scale needs low > 0"]),
    (_with("batch_size", {"intlog": [0, 4]}), ["batch_size", "log scale needs low > 0"]),
    (_with("loss", {"choice": []}), ["loss", "non-empty list"]),
    (_with("loss", {"choice": ["dice_bce", "focal"]}), ["loss", "'focal' is not a valid loss"]),
    (_with("batch_size", {"uniform": [1, 4]}), ["batch_size", "not a valid batch_size"]),
    (_with("batch_size", {"int": [1.5, 4]}), ["batch_size", "must be integers"]),
    (_with("data.threshold", {"uniform": ["a", 1]}), ["data.threshold", "two numbers"]),
    (_with("data.threshold", {"uniform": [0.1, 2.0]}), ["data.threshold", "not a valid data.threshold"]),
    (_with("model.widths", {"choice": [[16], [8, 16]]}), ["model.widths", "not a valid model.widths"]),
    (_with("loss", "dice_bce"), ["loss", "expected a mapping"]),
    (_with("loss", {"choice": ["dice_bce"], "uniform": [0, 1]}), ["loss", "exactly one distribution"]),
    (_with("data.patch_size", {"choice": [32, 64], "when": {"data.level": "64"}}),
     ["data.patch_size", "condition on unknown parameter 'data.level'"]),
    (_with("data.patch_size", {"choice": [32, 64], "when": {"model.architecture": "vnet"}}),
     ["data.patch_size", "can never be 'vnet'"]),
    (_with("data.patch_size", {"choice": [32], "when": {"optim.lr": 0.001}}),
     ["data.patch_size", "optim.lr must be a choice parameter"]),
    (_with("loss", {"choice": ["dice_bce"], "implies": {"gdl_ce": {"data.level": "64"}}}),
     ["loss", "implies", "'gdl_ce' is not one of the choices"]),
    (_with("loss", {"choice": ["dice_bce"], "implies": {"dice_bce": {"optim.lr": 0.1}}}),
     ["loss", "optim.lr is already fixed or searched"]),
    ({"name": "t", "parameters": {"data.patch_size": {"choice": [32], "when": {"loss": "gdl_ce"}},
                                  "loss": {"choice": ["dice_bce", "gdl_ce"]}}},
     ["data.patch_size", "'loss', which is declared below"]),
    ({**VALID, "mode": "maximise"}, ["mode", "'max' or 'min'"]),
    ({**VALID, "num_samples": 0}, ["num_samples", "integer >= 1"]),
    ({**VALID, "max_epochs": "ten"}, ["max_epochs", "integer >= 1"]),
    ({**VALID, "searcher": "tpe"}, ["unknown key(s) searcher"]),
    ({**VALID, "fixed": {"data.levle": "64"}}, ["fixed: data.levle", "unknown parameter"]),
    ({**VALID, "fixed": {"epochs": 0}}, ["fixed: epochs", "not a valid epochs"]),
    ({**VALID, "fixed": {"optim.lr": 0.1}}, ["optim.lr", "also in 'fixed'"]),
    ({"name": "t"}, ["parameters", "non-empty mapping"]),
    ("- just\n- a list\n", ["expected a mapping"]),
    ("parameters: {a: [\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("doc,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_space_files_fail_naming_file_and_parameter(tmp_path, doc, words):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such search-space file"):
        SearchSpace.load(tmp_path / "nope.yaml")


def test_valid_minimal_space_defaults(tmp_path):
    space = SearchSpace.load(_write(tmp_path, VALID))
    assert (space.metric, space.mode, space.max_epochs) == ("val_dice", "max", None)
    assert TrainConfig().epochs == space.trial_config(TrainConfig(), {}).epochs


def test_importances_need_two_finished_trials():
    space = SearchSpace.load(SPACES / "smoke.yaml")
    params = _sample(space, 6, seed=3)
    one = [TrialSummary("a", "TERMINATED", params[0], 0.5, 2, None)]
    assert param_importances(space, one) == {}
    many = [TrialSummary(str(i), "TERMINATED", p, p["optim.lr"] * 10, 2, None) for i, p in enumerate(params)]
    many.append(TrialSummary("x", "ERROR", params[0], None, 0, None))
    imp = param_importances(space, many)
    assert imp and set(imp) <= {p.name for p in space.parameters}
    assert abs(sum(imp.values()) - 1.0) < 1e-6


def test_levels_a_space_can_train_on():
    base = TrainConfig()
    assert SearchSpace.load(SPACES / "default.yaml").levels(base) == {"2mm"}
    assert SearchSpace.load(SPACES / "seed_replication.yaml").levels(base) == {"64", "128"}
    smoke = SearchSpace.load(SPACES / "smoke.yaml")
    assert smoke.levels(base) == {"64"}
    assert smoke.levels(TrainConfig.from_dict({"data": {"level": "32"}})) == {"32"}


def test_trial_error_line_is_the_exception_not_the_task_header():
    from stroke_ray.sweep_report import error_line

    err = RuntimeError(
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=x)\n  File \"a.py\", line 3, in f\n"
        "    raise StrokeRayError(msg)\nstroke_ray.errors.StrokeRayError: /s.zarr: needs at least 2\n\n"
    )
    assert error_line(err) == "stroke_ray.errors.StrokeRayError: /s.zarr: needs at least 2"


def test_search_space_accepts_nested_augment_fields():
    space = SearchSpace.from_dict({
        "fixed": {"augment.elastic.p": 0.2},
        "parameters": {
            "augment.preset": {"choice": ["none", "light", "strong"]},
            "augment.rotation.degrees": {"uniform": [0.0, 30.0], "when": {"augment.preset": ["strong"]}},
            "augment.scale.range": {"choice": [[0.85, 1.25], [0.7, 1.4]]},
        },
    })
    cfg = space.trial_config(
        TrainConfig(), {"augment.preset": "strong", "augment.rotation.degrees": 12.5, "augment.scale.range": "[0.85, 1.25]"}
    ).augment
    assert cfg.preset == "strong" and cfg.rotation.degrees == 12.5 and cfg.scale.range == (0.85, 1.25)
    assert cfg.resolved().elastic.p == 0.2 and cfg.resolved().gamma.p == AUGMENT_PRESETS["strong"]["gamma"]["p"]
    with pytest.raises(ConfigError, match="augment.elastic.p"):
        SearchSpace.from_dict({"parameters": {"augment.elastic.p": {"choice": [0.1, 3.0]}}})


def test_trial_resources_split_over_workers_and_pack_trials():
    from stroke_ray.tune_trial import trial_concurrency

    space = SearchSpace.from_dict({
        "gpus_per_trial": 0.25, "cpus_per_trial": 3,
        "parameters": {"optim.lr": {"loguniform": [1e-4, 1e-2]}},
    })
    cfg = space.trial_config(TrainConfig(), {})
    assert cfg.use_gpu is True and cfg.gpus_per_worker == 0.25 and cfg.cpus_per_worker == 3.0
    # g5.4xlarge: 16 vCPUs, 1 A10G: four 0.25-GPU trials of 3 CPUs (+ 0.01 each for the driver)
    assert trial_concurrency(cfg, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert trial_concurrency(cfg, {"CPU": 8.0, "GPU": 1.0}) == 2  # g5.2xlarge: CPUs bound it
    two = space.trial_config(TrainConfig(num_workers=2), {})
    assert two.gpus_per_worker == 0.125 and two.cpus_per_worker == 1.5
    # CLI flags over the file; 0 GPUs trains on CPUs with fractional CPUs
    cpu = space.resources.merged(TrialResources(gpus_per_trial=0, cpus_per_trial=0.5)).apply(TrainConfig())
    assert cpu.use_gpu is False and cpu.cpus_per_worker == 0.5
    assert trial_concurrency(cpu, {"CPU": 2.0}) == 3  # 3 x (0.5 + 0.01) <= 2


@pytest.mark.parametrize("raw, words", [
    ({"gpus_per_trial": 1.5}, "gpus_per_trial"),
    ({"gpus_per_trial": -1}, "gpus_per_trial"),
    ({"cpus_per_trial": 0}, "cpus_per_trial"),
    ({"cpus_per_trial": "many"}, "cpus_per_trial"),
])
def test_bad_trial_resources_fail_naming_the_file_and_key(raw, words):
    with pytest.raises(ConfigError, match=f"space.yaml: .*{words}"):
        SearchSpace.from_dict({**raw, "parameters": {"optim.lr": {"uniform": [0.1, 0.2]}}}, source="space.yaml")
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        TrainConfig.from_dict({"gpus_per_worker": 2.5})
