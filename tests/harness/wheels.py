"""Tiny, real wheels and source trees for pip tests (offline: no index)."""
from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, name: str, version: str = "1.0", body: str = "VALUE = 42\n") -> Path:
    """A pure-Python wheel with one module ``name`` (``import name``)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": body.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: conda-stage-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(k, v) for k, v in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = Path(folder) / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in files.items():
            zf.writestr(arcname, data)
    path.chmod(0o644)
    return path


def make_project(folder: Path, name: str) -> Path:
    """A setuptools project with a pyproject.toml, so that ``pip install -e``
    makes a modern (PEP 660) editable install."""
    root = Path(folder) / name
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "__init__.py").write_text("VALUE = 1\n")
    (root / "setup.py").write_text(
        f"from setuptools import setup\nsetup(name={name!r}, version='1.0', packages=[{name!r}])\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64", "wheel"]\n'
        'build-backend = "setuptools.build_meta"\n')
    return root
