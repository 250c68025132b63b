"""The package version, defined once: ``[project] version`` in pyproject.toml.

An installed package (wheel, ``pip install .`` or ``-e .``) reads it from its metadata; a bare source
checkout on ``sys.path`` that was never installed reads pyproject.toml next to the package.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DIST_NAME = "magi-kernels"


def _from_pyproject() -> str:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return "0+unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    m = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M) if project else None
    return f"{m.group(1)}+source" if m else "0+unknown"


def package_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return _from_pyproject()


version = package_version()
