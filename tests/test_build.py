"""The standard build: the wheel that `pip wheel --no-build-isolation --no-deps .` makes offline.

It is built from a copy of the project files (tests/ and bench/ included, so that their exclusion is
checked), never in the working tree. Checks the metadata against pyproject.toml and the version
module, and the contents against the package folders.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["tritonsplat", "tracking", "data_tools"]
NOT_IN_WHEEL = ["tests", "bench"]
PROJECT_FILES = ["pyproject.toml", "README.md", "LICENSE", "CITATION.cff"]


def _version() -> str:
    scope: dict = {}
    exec((ROOT / "tritonsplat" / "_version.py").read_text(), scope)
    return scope["__version__"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for folder in PACKAGES + NOT_IN_WHEEL:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheelhouse")
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "-w", str(out), str(source)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("tritonsplat-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"tritonsplat-{_version()}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def test_wheel_metadata_matches_pyproject(wheel):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = _metadata(wheel)
    assert meta["Name"] == "tritonsplat"
    assert meta["Version"] == _version() and wheel.name.startswith(f"tritonsplat-{_version()}-py3-none-any")
    assert meta["Author"] == project["authors"][0]["name"]
    assert (meta["License"] or meta["License-Expression"]) == "Apache-2.0"
    assert meta["Requires-Python"] == project["requires-python"]
    requires = {str(Requirement(r)) for r in meta.get_all("Requires-Dist")}
    for dependency in project["dependencies"]:
        assert str(Requirement(dependency)) in requires, dependency
    extras = set(meta.get_all("Provides-Extra"))
    assert set(project["optional-dependencies"]) <= extras


def test_wheel_contents_are_the_packages_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(f"tritonsplat-{_version()}.dist-info/entry_points.txt").decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == set(PACKAGES) | {f"tritonsplat-{_version()}.dist-info"}
    for folder in NOT_IN_WHEEL:
        assert not any(name.startswith(f"{folder}/") for name in names), folder
    expected = {p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                if "__pycache__" not in p.parts}
    assert expected == {name for name in names if name.endswith(".py")}
    # setuptools >= 77 puts license files under dist-info/licenses/, older ones in dist-info/.
    assert {f"tritonsplat-{_version()}.dist-info/{d}LICENSE" for d in ("licenses/", "")} & set(names)
    assert "tritonsplat-track = tracking.cli:main" in entry_points
    assert "data-tools = data_tools.cli:main" in entry_points
    assert "tritonsplat = tritonsplat.cli:main" in entry_points
