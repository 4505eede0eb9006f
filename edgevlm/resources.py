"""Where the data the package reads at run time lives: in an installed wheel, or next to the source tree.

The repository keeps its data at the top level (``export/targets/*.toml``, ``calibration/*.toml``); a wheel maps
them into the package as ``edgevlm/_data/targets`` and ``edgevlm/_data/calibration`` (``pyproject.toml``:
``[tool.setuptools.package-dir]``). ``data_dir("targets")`` looks in the installed package first (importlib.resources)
and in the source tree second, so a checkout, an editable install and a wheel install all find the same files.
The native kernel's C source is ordinary package data of ``edgevlm.runtime.native`` (found beside its module).
Stdlib only: the device side imports this module.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DATA", "data_dir"]

#: name -> the folder in the source tree (relative to the repository root) that the wheel maps to edgevlm/_data/<name>
DATA = {"targets": "export/targets", "calibration": "calibration"}

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _packaged(name: str) -> Path | None:
    try:
        entry = resources.files("edgevlm").joinpath("_data", name)
    except (ModuleNotFoundError, TypeError):      # pragma: no cover - edgevlm always imports here
        return None
    if not entry.is_dir():
        return None
    path = Path(str(entry))                       # wheels install unpacked: the entry is a real folder
    return path if path.is_dir() else None


def data_dir(name: str) -> Path:
    """The folder holding the data ``name`` (a key of ``DATA``): the installed package's copy, else the source tree's.

    Returns the source-tree path when neither exists, so the caller's "not found" message names where it looked."""
    if name not in DATA:
        raise KeyError(f"unknown data folder '{name}'; known: {', '.join(DATA)}")
    return _packaged(name) or (_SOURCE_ROOT / DATA[name])
