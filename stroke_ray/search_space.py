"""The search-space language: which TrainConfig fields a sweep searches, and how.

A search space is a YAML file (docs/tuning.md) of dotted TrainConfig paths, each with one
distribution (`choice`, `uniform`, `loguniform`, `int`, `intlog`), an optional `when`
condition on a choice declared above it and, for choices, `implies` (other fields a value
sets). `SearchSpace.load` validates the whole file against TrainConfig up front, so a typo
fails with one line naming the file and the parameter, before any trial starts. Calling a
`SearchSpace` on an Optuna trial samples one configuration (define-by-run, so conditional
parameters are only suggested when active).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stroke_ray.config import TrainConfig, read_yaml
from stroke_ray.errors import ConfigError
from stroke_ray.resources import search_space_file

__all__ = ["DISTRIBUTIONS", "SPACE_KEYS", "Parameter", "SearchSpace", "TrialResources"]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "intlog")
SPACE_KEYS = {
    "name", "description", "metric", "mode", "num_samples", "max_epochs", "grace_period",
    "reduction_factor", "fixed", "parameters", "cpus_per_trial", "gpus_per_trial",
}


class TrialResources(BaseModel):
    """What one trial's Train workers hold, in all: CPUs and GPUs per trial (fractions allowed).

    None keeps the base config's per-worker settings. A trial's `num_workers` workers split
    them evenly (`cpus_per_worker = cpus_per_trial / num_workers`); `gpus_per_trial: 0`
    trains on CPUs, anything above turns `use_gpu` on. The trial's driver holds 0.01 CPU
    beside them (`tune_trial.DRIVER_CPU`). This model is the one place both settings are checked,
    whether they come from a search-space file or from `stroke-ray tune`'s flags.
    """

    model_config = ConfigDict(extra="forbid")
    cpus_per_trial: float | None = Field(None, gt=0)
    gpus_per_trial: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ray_gpu_rule(self) -> "TrialResources":
        gpus = self.gpus_per_trial
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus_per_trial: a share of one GPU (<= 1) or whole GPUs, not {gpus}")
        return self

    @classmethod
    def parse(cls, source: str, **values: Any) -> "TrialResources":
        """Validated resources; a bad value raises ConfigError naming `source` and the key."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'resources'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{source}: {problems}") from None

    def merged(self, other: "TrialResources") -> "TrialResources":
        """These settings with `other`'s set values on top (CLI flags over the file)."""
        return TrialResources(**{**self.model_dump(), **other.model_dump(exclude_none=True)})

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with the trial's resources split over its workers.

        Raises:
            ConfigError: a GPU share per worker that Ray cannot grant (e.g. 1.5).
        """
        update: dict[str, Any] = {}
        if self.cpus_per_trial is not None:
            update["cpus_per_worker"] = self.cpus_per_trial / cfg.num_workers
        if self.gpus_per_trial is not None:
            update["use_gpu"] = self.gpus_per_trial > 0
            if self.gpus_per_trial > 0:
                update["gpus_per_worker"] = self.gpus_per_trial / cfg.num_workers
        if not update:
            return cfg
        return TrainConfig.from_dict({**cfg.model_dump(), **update}, source="trial resources")


def _leaf_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable TrainConfig field as a dotted path (model.widths, optim.lr, ...)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaf_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _primitive(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


@dataclass
class Parameter:
    """One searched TrainConfig field: a distribution and an optional `when` condition."""

    name: str
    kind: str  # one of DISTRIBUTIONS
    values: list  # the choices, or [low, high]
    when: dict[str, list] = field(default_factory=dict)
    # choice value -> other fields it sets, e.g. unet3d -> {data.level: "64"}
    implies: dict[Any, dict[str, Any]] = field(default_factory=dict)

    @property
    def encoded(self) -> bool:
        # Optuna's categorical choices must be scalars; lists (model.widths) go through JSON.
        return self.kind == "choice" and not all(_primitive(v) for v in self.values)

    def labels(self) -> list:
        return [json.dumps(v) for v in self.values] if self.encoded else list(self.values)

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or Tune's capturing proxy of one) for a value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.labels())
        low, high = self.values
        if self.kind == "uniform":
            return trial.suggest_float(self.name, low, high)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, low, high, log=True)
        return trial.suggest_int(self.name, int(low), int(high), log=self.kind == "intlog")

    def distribution(self):
        """The matching `optuna.distributions` object (to rebuild a study from results)."""
        from optuna import distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.labels())
        low, high = self.values
        if self.kind in ("uniform", "loguniform"):
            return d.FloatDistribution(low, high, log=self.kind == "loguniform")
        return d.IntDistribution(int(low), int(high), log=self.kind == "intlog")


@dataclass
class SearchSpace:
    """A validated search-space file. Calling it on an Optuna trial samples one config.

    Parameters are sampled in file order, so a `when` condition may only refer to a
    parameter declared above it; an inactive parameter keeps the base config's value.
    """

    name: str
    parameters: list[Parameter]
    metric: str = "val_dice"
    mode: str = "max"
    num_samples: int = 20
    max_epochs: int | None = None
    grace_period: int = 1
    reduction_factor: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = "search space"
    resources: TrialResources = field(default_factory=TrialResources)

    # -- loading and validation -----------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path) -> "SearchSpace":
        """Read and validate a YAML search space (a file, or a shipped name such as `default`).

        Raises:
            ConfigError: a missing file or an invalid space, naming the file and the parameter.
        """
        path = search_space_file(name_or_path)
        return cls.from_dict(read_yaml(path, "search-space file"), source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "search space") -> "SearchSpace":
        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{source}: {problem}")

        if not isinstance(raw, dict):
            raise fail("expected a mapping with 'parameters' at the top level")
        unknown = sorted(set(raw) - SPACE_KEYS)
        if unknown:
            raise fail(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(SPACE_KEYS))})")
        if raw.get("mode", "max") not in ("max", "min"):
            raise fail(f"mode: must be 'max' or 'min', not {raw.get('mode')!r}")
        if not isinstance(raw.get("metric", "val_dice"), str):
            raise fail("metric: must be a metric name such as val_dice")
        for key, lowest in (("num_samples", 1), ("max_epochs", 1), ("grace_period", 1), ("reduction_factor", 2)):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < lowest):
                raise fail(f"{key}: must be an integer >= {lowest}, not {value!r}")

        fields = _leaf_fields()
        fixed = raw.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise fail("fixed: must be a mapping of config field -> value")
        for key, value in fixed.items():
            if key not in fields:
                raise fail(f"fixed: {key}: unknown parameter (not a TrainConfig field; e.g. {_examples()})")
            _check_value(source, f"fixed: {key}", key, value)

        params_raw = raw.get("parameters")
        if not isinstance(params_raw, dict) or not params_raw:
            raise fail("parameters: must be a non-empty mapping of config field -> distribution")
        params: list[Parameter] = []
        for name, spec in params_raw.items():
            params.append(_parse_parameter(source, name, spec, fields, params, fixed, list(params_raw)))

        return cls(
            name=str(raw.get("name") or Path(source).stem),
            parameters=params,
            metric=raw.get("metric", "val_dice"),
            mode=raw.get("mode", "max"),
            num_samples=raw.get("num_samples", 20),
            max_epochs=raw.get("max_epochs"),
            grace_period=raw.get("grace_period", 1),
            reduction_factor=raw.get("reduction_factor", 3),
            fixed=dict(fixed),
            description=str(raw.get("description", "")),
            source=source,
            resources=TrialResources.parse(
                source, cpus_per_trial=raw.get("cpus_per_trial"), gpus_per_trial=raw.get("gpus_per_trial")
            ),
        )

    # -- sampling ---------------------------------------------------------------------

    def __call__(self, trial) -> None:
        """Optuna define-by-run function: suggest every active parameter, in order."""
        self.sample(trial)

    def sample(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for p in self.parameters:
            if self._active(p, chosen):
                chosen[p.name] = p.decode(p.suggest(trial))
        return chosen

    def _active(self, p: Parameter, chosen: dict[str, Any]) -> bool:
        return all(ref in chosen and chosen[ref] in allowed for ref, allowed in p.when.items())

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sampled values as Tune hands them over -> config values (lists un-JSONed)."""
        by_name = {p.name: p for p in self.parameters}
        return {k: by_name[k].decode(v) if k in by_name else v for k, v in params.items()}

    def trial_config(self, base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
        """base config + fixed values + max_epochs + one trial's sampled values + resources."""
        tree = base.model_dump()
        for key, value in self.fixed.items():
            _set_path(tree, key, value)
        if self.max_epochs is not None:
            tree["epochs"] = self.max_epochs
        by_name = {p.name: p for p in self.parameters}
        for key, value in self.decode(params).items():
            _set_path(tree, key, value)
            implied = by_name[key].implies if key in by_name else {}
            for other, other_value in implied.get(value, {}).items() if _primitive(value) else ():
                _set_path(tree, other, other_value)
        return self.resources.apply(TrainConfig.from_dict(tree, source=f"{self.source}: trial config"))

    def levels(self, base: TrainConfig) -> set[str]:
        """Every store level a trial of this space can train on."""
        found = {self.trial_config(base, {}).data.level}
        for p in self.parameters:
            if p.name == "data.level":
                found |= {str(v) for v in p.values}
            found |= {str(v["data.level"]) for v in p.implies.values() if "data.level" in v}
        return found


def _examples() -> str:
    return "model.architecture, data.patch_size, optim.lr, loss, batch_size"


def _check_value(source: str, where: str, path: str, value: Any) -> None:
    """Does `value` fit the TrainConfig field `path`? (pydantic decides, on a default config)."""
    tree = TrainConfig().model_dump()
    _set_path(tree, path, value)
    try:
        TrainConfig.model_validate(tree)
    except Exception as exc:  # pydantic.ValidationError
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise ConfigError(f"{source}: {where}: {value!r} is not a valid {path} ({msg})") from None


def _parse_parameter(source, name, spec, fields, earlier: list[Parameter], fixed, declared: list) -> Parameter:
    where = f"parameters: {name}"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {problem}")

    if name not in fields:
        raise fail(f"unknown parameter (not a TrainConfig field; e.g. {_examples()})")
    if name in fixed:
        raise fail("is also in 'fixed'; a field is either searched or fixed")
    if not isinstance(spec, dict):
        raise fail(f"expected a mapping such as {{choice: [...]}} or {{uniform: [low, high]}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k not in ("when", "implies")]
    if extra:
        raise fail(f"unknown distribution type {', '.join(map(str, extra))} (use one of {', '.join(DISTRIBUTIONS)})")
    if len(kinds) != 1:
        raise fail(f"needs exactly one distribution ({', '.join(DISTRIBUTIONS)}), found {len(kinds)}")
    kind = kinds[0]
    values = spec[kind]

    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise fail("choice: needs a non-empty list of values")
        for v in values:
            _check_value(source, where, name, v)
    else:
        if not isinstance(values, list) or len(values) != 2 or not all(_is_number(v) for v in values):
            raise fail(f"{kind}: needs [low, high] as two numbers, got {values!r}")
        low, high = values
        if kind in ("int", "intlog") and not all(isinstance(v, int) for v in values):
            raise fail(f"{kind}: low and high must be integers, got {values!r}")
        if low >= high:
            raise fail(f"{kind}: low ({low}) must be < high ({high})")
        if kind in ("loguniform", "intlog") and low <= 0:
            raise fail(f"{kind}: a log scale needs low > 0, got {low}")
        # A float sampled for an int field would be rejected (or silently truncated) later.
        probes = [low, high] + ([(low + high) / 2 + 1e-3] if kind in ("uniform", "loguniform") else [])
        for v in probes:
            _check_value(source, where, name, v)

    when_raw = spec.get("when") or {}
    if not isinstance(when_raw, dict):
        raise fail("when: must be a mapping of parameter -> value (or list of values)")
    known = {p.name: p for p in earlier}
    when: dict[str, list] = {}
    for ref, allowed in when_raw.items():
        if ref not in known:
            if ref in declared:
                raise fail(f"when: condition on {ref!r}, which is declared below; conditions may only use parameters declared above")
            raise fail(f"when: condition on unknown parameter {ref!r} (not a searched parameter)")
        parent = known[ref]
        if parent.kind != "choice":
            raise fail(f"when: {ref} must be a choice parameter to be used in a condition")
        allowed = allowed if isinstance(allowed, list) and not parent.encoded else [allowed]
        missing = [a for a in allowed if a not in parent.values]
        if missing:
            raise fail(f"when: {ref} can never be {missing[0]!r} (its choices: {parent.values})")
        when[ref] = allowed

    implies_raw = spec.get("implies") or {}
    if implies_raw and kind != "choice":
        raise fail("implies: only a choice parameter can imply other fields")
    if not isinstance(implies_raw, dict):
        raise fail("implies: must be a mapping of choice value -> {field: value}")
    implies: dict[Any, dict[str, Any]] = {}
    searched = {p.name for p in earlier} | {name}
    for choice, sets in implies_raw.items():
        if choice not in values or not _primitive(choice):
            raise fail(f"implies: {choice!r} is not one of the choices {values}")
        if not isinstance(sets, dict):
            raise fail(f"implies: {choice}: must be a mapping of field -> value")
        for other, other_value in sets.items():
            if other not in fields:
                raise fail(f"implies: {choice}: {other}: unknown parameter (not a TrainConfig field)")
            if other in fixed or other in searched:
                raise fail(f"implies: {choice}: {other} is already fixed or searched")
            _check_value(source, f"{where}: implies: {choice}", other, other_value)
        implies[choice] = dict(sets)
    return Parameter(name=name, kind=kind, values=list(values), when=when, implies=implies)

