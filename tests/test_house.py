"""The shared homes: atomic files, NIfTI names, local-or-URL locations, one z-score; the import rule."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from stroke_ray.files import atomic_path, atomic_write_bytes, atomic_write_text, strip_nifti_suffix
from stroke_ray.inference import normalise_case
from stroke_ray.intensity import normalise
from stroke_ray.errors import StrokeRayError
from stroke_ray.locations import absolute, exists, is_url, join, local_or_url, make_folder
from stroke_ray.store import LevelArrays, StrokeStore


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_temporary_name_is_hidden_and_not_nifti(tmp_path):
    with atomic_path(tmp_path / "case_dwi.nii.gz") as tmp:
        assert tmp.name.startswith(".") and tmp.name.endswith(".part")
        assert tmp.parent == tmp_path


@pytest.mark.parametrize("name,stem", [
    ("sub-1_dwi.nii.gz", "sub-1_dwi"), ("a/b/sub-1_dwi.nii", "sub-1_dwi"), ("notes.txt", "notes.txt"),
])
def test_strip_nifti_suffix(name, stem):
    assert strip_nifti_suffix(name) == stem


def test_locations_keep_urls_and_make_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_url("s3://bucket/x") and not is_url("data/x.zarr")
    assert absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert absolute("data/x.zarr") == str(tmp_path.resolve() / "data" / "x.zarr")
    assert join("s3://bucket/runs/", "sweep", "best") == "s3://bucket/runs/sweep/best"
    assert join("runs", "sweep") == str(Path("runs") / "sweep")
    assert local_or_url("file:///tmp/x") == "/tmp/x" and local_or_url("memory://x") == "memory://x"
    assert exists("s3://bucket/anything") and not exists(tmp_path / "missing")


def test_make_folder_makes_local_folders_and_refuses_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "runs" / "deep")
    assert (tmp_path / "runs" / "deep").is_dir()
    make_folder(tmp_path / "runs")  # already there: nothing to do
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    with pytest.raises(StrokeRayError, match=r"a-file: exists and is not a folder$"):
        make_folder(blocker)
    with pytest.raises(StrokeRayError, match=r"a-file/runs: cannot create the folder \(Not a directory\)$"):
        make_folder(blocker / "runs")
    assert blocker.read_text() == "kept"
    make_folder("s3://bucket/runs")  # a URL is its filesystem's business: no local folder
    assert not (tmp_path / "s3:").exists()


def test_store_reads_and_prediction_normalise_identically(tmp_path):
    """One z-score for training and prediction: the same numbers for the same subject."""
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, (2, 8, 8, 8)).astype(np.float32)
    norm = {"mean": [100.0, 90.0], "std": [20.0, 10.0]}
    store = StrokeStore.create(str(tmp_path / "s.zarr"), ["dwi", "adc"], ["native"])
    store.write_subject("sub-1", {"native": LevelArrays(image, np.zeros((8, 8, 8), np.uint8), np.eye(4))},
                        {"norm": norm})
    from_store = store.normalise("sub-1", np.asarray(store.image("sub-1")[...]))
    from_case = normalise_case(image, {"norm": norm}, "zscore")
    np.testing.assert_array_equal(from_store, from_case)
    np.testing.assert_allclose(from_case[1], (image[1] - 90.0) / 10.0, rtol=1e-6)
    assert normalise(image, "none", None).dtype == np.float32
    with pytest.raises(ValueError, match="unknown normalization"):
        normalise(image, "minmax", norm)


def test_old_data_num_workers_key_names_its_new_name(tmp_path):
    from stroke_ray.config import TrainConfig
    from stroke_ray.errors import ConfigError

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"old.yaml: data: num_workers was renamed loader_workers"):
        TrainConfig.from_yaml(path)
    assert TrainConfig.from_dict({"data": {"loader_workers": 2}}).data.loader_workers == 2


def test_stored_config_with_the_old_num_workers_key_is_migrated():
    from stroke_ray.config import TrainConfig
    from stroke_ray.errors import ConfigError

    stored = {"name": "old-run", "num_workers": 1, "data": {"num_workers": 2, "level": "32"}}
    migrated = TrainConfig.from_stored(stored, source="old.pt")
    assert migrated.data.loader_workers == 2 and migrated.num_workers == 1 and migrated.data.level == "32"
    assert stored["data"] == {"num_workers": 2, "level": "32"}  # the caller's dict is left as it was
    # both names: the new one counts
    both = TrainConfig.from_stored({"data": {"num_workers": 2, "loader_workers": 4}})
    assert both.data.loader_workers == 4
    # migration fixes renamed keys only: anything else invalid is still an error naming the source
    with pytest.raises(ConfigError, match=r"old.pt: data.threshold"):
        TrainConfig.from_stored({"data": {"num_workers": 2, "threshold": 3.0}}, source="old.pt")
    # a new config file with the old key still gets the error naming the new key
    with pytest.raises(ConfigError, match="num_workers was renamed loader_workers"):
        TrainConfig.from_dict({"data": {"num_workers": 2}})


# -- the import rule (docs/architecture.md, "Imports")

PACKAGE = Path(__file__).resolve().parents[1] / "stroke_ray"
# 1. The CLI edge: each command imports its stage when it runs.
CLI_EDGE = {"stroke_ray.cli", "stroke_ray.cli_model"}
# 2. Ray worker functions: they import what they need where they run.
RAY_WORKER_FUNCTIONS = {
    "stroke_ray.train.train_loop_per_worker",  # a Ray Train worker
    "stroke_ray.tune_trial.TrialDriver.__call__",  # a Tune trial's driver
    "stroke_ray.http_guard.proxy_middlewares",  # called inside Serve's proxy actor
}
# 3. Heavy or optional dependencies; an in-package module that imports one of them at its
# top is heavy too (found below), e.g. model_ref's checkpoint (torch) and mlflow_model.
HEAVY_OR_OPTIONAL = {
    "torch", "ray", "mlflow", "optuna", "matplotlib", "nilearn", "monai", "pyarrow",
    "onnx", "onnxruntime", "s3fs", "torchio",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement loads (`from pkg import mod` counts as pkg.mod too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative to the module's package (a package's __init__ is its own)
        package = module.split(".")
        if not (PACKAGE.parent / Path(*package) / "__init__.py").is_file():
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _function_local_imports(tree: ast.AST) -> list[tuple[str, ast.Import | ast.ImportFrom]]:
    """(qualified function name, import) for every import inside a function body."""
    found = []

    def walk(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                walk(child, [*scope, child.name], in_function)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append((".".join(scope), child))
            else:
                walk(child, scope, in_function)

    walk(tree, [], False)
    return found


def _package():
    trees = {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}
    top_level = {}
    for name, tree in trees.items():
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        local = {id(n) for _, n in _function_local_imports(tree)}
        top_level[name] = {m for n in imports if id(n) not in local for m in _imported(n, name)}
    return trees, top_level


def _heavy_modules(top_level: dict[str, set[str]]) -> set[str]:
    """In-package modules whose top-level imports load a heavy dependency (directly or not)."""
    heavy = {name for name, deps in top_level.items() if any(d.split(".")[0] in HEAVY_OR_OPTIONAL for d in deps)}
    while True:
        more = {name for name, deps in top_level.items() if name not in heavy and deps & heavy}
        if not more:
            return heavy
        heavy |= more


def _allowed(module: str, function: str, imported: list[str], heavy: set[str]) -> bool:
    if module in CLI_EDGE or f"{module}.{function}" in RAY_WORKER_FUNCTIONS:
        return True
    # `from pkg import name`: the statement is allowed when what it loads is heavy.
    return any(m.split(".")[0] in HEAVY_OR_OPTIONAL or m in heavy for m in imported)


def test_function_local_imports_follow_the_rule():
    """Imports sit at the top of a module, but for the CLI edge, Ray worker functions and
    heavy or optional dependencies (docs/architecture.md, "Imports")."""
    trees, top_level = _package()
    heavy = _heavy_modules(top_level)
    assert {"stroke_ray.checkpoint", "stroke_ray.tune"} <= heavy and "stroke_ray.files" not in heavy
    broken = [
        f"{module}.{function} (line {node.lineno}): {ast.unparse(node)}"
        for module, tree in trees.items()
        for function, node in _function_local_imports(tree)
        if not _allowed(module, function, _imported(node, module), heavy)
    ]
    assert not broken, "function-local imports the rule does not allow:\n" + "\n".join(broken)


def test_the_import_rule_sees_a_local_stdlib_import():
    tree = ast.parse("import json\n\ndef f():\n    import time\n    from stroke_ray.files import is_nifti\n")
    (_, stdlib), (_, light) = _function_local_imports(tree)
    heavy = {"stroke_ray.checkpoint"}
    assert not _allowed("stroke_ray.x", "f", _imported(stdlib, "stroke_ray.x"), heavy)
    assert not _allowed("stroke_ray.x", "f", _imported(light, "stroke_ray.x"), heavy)
    assert _allowed("stroke_ray.cli", "f", _imported(stdlib, "stroke_ray.cli"), heavy)
    lazy = ast.parse("from stroke_ray.checkpoint import checkpoint_file").body[0]
    assert _allowed("stroke_ray.x", "f", _imported(lazy, "stroke_ray.x"), heavy)
