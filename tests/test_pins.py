"""Dependency pins: lower bounds that exclude vulnerable releases, and a constraints file
that matches them (scripts/setup.sh and cluster.yaml install with it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name.lower(): r for r in reqs}


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^ ;]+)\s*;\s*python_version == \"3\.11\"", line)
            assert m, f"constraints.txt: {line!r} is not 'name==version ; python_version == \"3.11\"'"
            pins[m[1].lower().replace("_", "-")] = Version(m[2])
    return pins


def test_lower_bounds_exclude_vulnerable_releases():
    reqs = _requirements()
    assert not reqs["torch"].specifier.contains("2.9.1") and reqs["torch"].specifier.contains("2.10.0")
    assert not reqs["python-multipart"].specifier.contains("0.0.17")


def test_constraints_pin_what_pyproject_allows_and_leave_torch_out():
    pins, reqs = _constraints(), _requirements()
    assert not any(name == "torch" or name.startswith(("nvidia-", "triton")) for name in pins)
    for name, req in reqs.items():
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {req}"
    # The direct dependencies CI installs are all pinned.
    for name in ("ray", "numpy", "mlflow", "nibabel", "python-multipart", "fastapi", "starlette", "uvicorn"):
        assert name in pins, name


def test_constraints_pin_every_requirement_setup_installs():
    # scripts/setup.sh installs .[test], which brings the export and s3 extras' packages too.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for name in ("test", "export", "s3") for r in project["optional-dependencies"][name]]
    names = {r.name.lower().replace("_", "-") for r in wanted} - {"torch", "stroke-ray"}
    pins = _constraints()
    assert sorted(n for n in names if n not in pins) == []
