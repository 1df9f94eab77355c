"""Shipped files (search spaces, configs) and a wheel that works outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError
from stroke_ray.resources import (
    config_file,
    search_space_file,
    shipped_configs,
    shipped_search_spaces,
)
from stroke_ray.search_space import SearchSpace

REPO = Path(__file__).resolve().parents[1]


def test_shipped_files_by_name_by_old_path_and_by_path(tmp_path, monkeypatch):
    assert {"default", "seed_replication", "smoke"} <= set(shipped_search_spaces())
    assert "train_example" in shipped_configs()
    monkeypatch.chdir(tmp_path)  # nowhere near the source tree
    assert SearchSpace.load("smoke").name == "smoke"
    assert SearchSpace.load("search_spaces/default.yaml").name == "default"  # the path docs used to give
    assert TrainConfig.from_yaml("train_example").data.loader_workers == 0
    assert config_file("configs/train_example.yaml") == config_file("train_example")
    mine = tmp_path / "smoke.yaml"
    mine.write_text("parameters:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert search_space_file("smoke.yaml").resolve() == mine.resolve()  # an existing file wins over a shipped name
    with pytest.raises(ConfigError, match=r"nope: no such search-space file, and not one that ships .*smoke"):
        SearchSpace.load("nope")
    with pytest.raises(ConfigError, match="no such config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_wheel_runs_the_cli_and_loads_the_demo_config_outside_the_source_tree(tmp_path):
    """`pip wheel --no-deps` offline, installed into a fresh venv that borrows this venv's
    dependencies: `stroke-ray --help` and the demo's search space load from the wheel."""
    dist = tmp_path / "dist"
    # Built from a copy of the sources: setuptools writes build/ and *.egg-info beside the
    # project, and a test leaves the working tree as it found it.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "stroke_ray", source / "stroke_ray", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(source)], check=True, cwd=tmp_path, timeout=600)
    wheel = next(dist.glob("stroke_ray-*.whl"))
    own_site = sysconfig.get_paths()["purelib"]
    own_before = sorted(os.listdir(own_site))
    venv = tmp_path / "venv"
    # A venv of its own with its own pip (ensurepip, offline), so the console script it
    # installs runs this venv's interpreter.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Installed before the dependencies are visible: pip then sees no other stroke-ray to
    # replace (it would uninstall this venv's editable install otherwise).
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, timeout=300)
    # The dependencies (torch, ray, ...) from this venv, as a plain path: its .pth files
    # (the editable install of the source tree) are not run, so stroke_ray comes from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert sorted(os.listdir(own_site)) == own_before, "installing the wheel changed this venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
    help_out = subprocess.run([str(venv / "bin" / "stroke-ray"), "--help"], **run)
    assert help_out.returncode == 0, help_out.stderr
    for command in ("demo", "tune", "export", "predict"):
        assert command in help_out.stdout
    probe = subprocess.run([str(python), "-c", (
        "import stroke_ray, stroke_ray.demo as d\n"
        "from stroke_ray.search_space import SearchSpace\n"
        "from stroke_ray.config import TrainConfig\n"
        "print(stroke_ray.__file__)\n"
        "print(SearchSpace.load(d.SMOKE_SPACE).name, SearchSpace.load('default').name)\n"
        "print(TrainConfig.from_yaml('train_example').model.architecture)\n"
        "print(TrainConfig.from_yaml('recipe').data.level, d.DEMO_LEVEL)\n"
    )], **run)
    assert probe.returncode == 0, probe.stderr
    module, spaces, arch, recipe = probe.stdout.strip().splitlines()
    assert module.startswith(str(venv)) and str(REPO) not in module
    assert spaces == "smoke default" and arch == "unet3d"
    assert recipe == "2mm 2mm"  # the config the demo trains from, at the demo's level
