"""A standard-library-only PEP 517 / PEP 660 build backend for tritonsplat.

Why not setuptools: pip builds in an isolated environment and must download the backend first, which
fails on an offline GPU machine (`pip install --no-deps -e .` with no index). This backend needs
nothing but Python >= 3.11 (tomllib), so the build requirements are empty and offline installs work.

It reads `[project]` from pyproject.toml (name, description, readme, license, requires-python,
dependencies, optional-dependencies, scripts) and the version from `tritonsplat/_version.py`, and builds:
- a wheel of the pure-Python packages listed in `[tool.tritonsplat-build] packages`;
- an editable wheel whose .pth file puts the source tree on sys.path (PEP 660);
- an sdist of the packages, tests and the project files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _project() -> dict:
    return _pyproject()["project"]


def _version() -> str:
    text = (ROOT / "tritonsplat" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', text)
    if match is None:
        raise RuntimeError("tritonsplat/_version.py: no __version__ = '...' found")
    return match.group(1)


def _normalised_name() -> str:
    return re.sub(r"[-_.]+", "_", _project()["name"]).lower()


def _dist_info() -> str:
    return f"{_normalised_name()}-{_version()}.dist-info"


def _metadata() -> str:
    project = _project()
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {_version()}"]
    if "description" in project:
        lines.append(f"Summary: {project['description']}")
    if "requires-python" in project:
        lines.append(f"Requires-Python: {project['requires-python']}")
    license_field = project.get("license")
    if isinstance(license_field, dict) and "text" in license_field:
        lines.append(f"License: {license_field['text']}")
    for classifier in project.get("classifiers", []):
        lines.append(f"Classifier: {classifier}")
    for name, url in project.get("urls", {}).items():
        lines.append(f"Project-URL: {name}, {url}")
    for requirement in project.get("dependencies", []):
        lines.append(f"Requires-Dist: {requirement}")
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        for requirement in requirements:
            marker = f'extra == "{extra}"'
            if ";" in requirement:
                requirement, existing = (part.strip() for part in requirement.split(";", 1))
                marker = f"({existing}) and {marker}"
            lines.append(f"Requires-Dist: {requirement}; {marker}")
    body = ""
    readme = project.get("readme")
    if isinstance(readme, str) and (ROOT / readme).exists():
        lines.append("Description-Content-Type: text/markdown")
        body = "\n" + (ROOT / readme).read_text()
    return "\n".join(lines) + "\n" + body


def _entry_points() -> str:
    scripts = _project().get("scripts", {})
    if not scripts:
        return ""
    return "[console_scripts]\n" + "".join(f"{name} = {target}\n" for name, target in scripts.items())


def _dist_info_files() -> dict[str, bytes]:
    info = _dist_info()
    files = {
        f"{info}/METADATA": _metadata().encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tritonsplat _build\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    entry_points = _entry_points()
    if entry_points:
        files[f"{info}/entry_points.txt"] = entry_points.encode()
    if (ROOT / "LICENSE").exists():
        files[f"{info}/LICENSE"] = (ROOT / "LICENSE").read_bytes()
    return files


def _package_files() -> dict[str, bytes]:
    """Python sources of the configured packages (arcname -> bytes)."""
    packages = _pyproject().get("tool", {}).get("tritonsplat-build", {}).get("packages", [])
    files = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if _SKIP_PARTS.isdisjoint(path.parts):
                files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
    return files


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _write_wheel(directory: str, files: dict[str, bytes], tag: str = "py3-none-any") -> str:
    name = f"{_normalised_name()}-{_version()}-{tag}.whl"
    files = {**files, **_dist_info_files()}
    record_name = f"{_dist_info()}/RECORD"
    record = "".join(f"{arcname},{_record_hash(data)},{len(data)}\n" for arcname, data in files.items())
    record += f"{record_name},,\n"
    target = Path(directory) / name
    temporary = target.with_suffix(".tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for arcname, data in {**files, record_name: record.encode()}.items():
            info = zipfile.ZipInfo(arcname, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data)
    temporary.replace(target)
    return name


def _write_metadata_directory(metadata_directory: str) -> str:
    for arcname, data in _dist_info_files().items():
        path = Path(metadata_directory) / arcname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return _dist_info()


# ---------------------------------------------------------------------------------------- PEP 517 hooks
def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, _package_files())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # The .pth line puts the checkout on sys.path: its packages import from the working tree.
    pth = f"_{_normalised_name()}_editable.pth"
    return _write_wheel(wheel_directory, {pth: (str(ROOT) + "\n").encode()})


def build_sdist(sdist_directory, config_settings=None):
    base = f"{_normalised_name()}-{_version()}"
    names = ["pyproject.toml", "README.md", "LICENSE", "CITATION.cff", "_build/backend.py"]
    packages = _pyproject().get("tool", {}).get("tritonsplat-build", {}).get("packages", [])
    for folder in [*packages, "tests"]:
        names += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / folder).rglob("*"))
                  if p.is_file() and _SKIP_PARTS.isdisjoint(p.parts)]
    target = Path(sdist_directory) / f"{base}.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            path = ROOT / name
            if path.exists():
                info = archive.gettarinfo(str(path), arcname=f"{base}/{name}")
                info.mtime = int(time.time())
                with path.open("rb") as handle:
                    archive.addfile(info, handle)
        pkg_info = _metadata().encode()
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(pkg_info)
        archive.addfile(info, io.BytesIO(pkg_info))
    target.write_bytes(buffer.getvalue())
    return target.name
