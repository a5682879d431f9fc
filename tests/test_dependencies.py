"""The installed packages meet the lower bounds pyproject.toml gives, and the bounds that keep loading safe stay."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# the loaders' known problems each bound excludes (reasons beside them in pyproject.toml)
SAFE_FLOORS = {"torch": "2.10", "transformers": "4.56", "safetensors": "0.5.3"}


def _requirements() -> dict[str, Requirement]:
    raw = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return {(r := Requirement(line)).name.lower(): r for line in raw}


@pytest.mark.parametrize("name", sorted(_requirements()))
def test_the_installed_version_meets_the_bound(name):
    req = _requirements()[name]
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is a dependency but not installed")
    assert req.specifier.contains(Version(installed).base_version, prereleases=True), f"{req.name} {installed}"


@pytest.mark.parametrize("name,floor", sorted(SAFE_FLOORS.items()))
def test_the_bounds_that_keep_loading_safe_are_kept(name, floor):
    req = _requirements()[name]
    assert any(s.operator == ">=" and Version(s.version) >= Version(floor) for s in req.specifier), req
