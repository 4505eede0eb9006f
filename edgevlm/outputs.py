"""Output directories: what edgevlm may replace, how it replaces it, and with which file modes.

Every verb that writes a directory (``demo``, ``train``, ``synth``, checkpoints; bundles use their manifest the same
way, see ``edgevlm.bundle.BundleWriter``) follows one rule: **it replaces only what it wrote itself.** A directory
it writes carries a marker file, ``.edgevlm-output.json`` (``{"kind": ..., "edgevlm": version}``). A destination
that exists may be reused or replaced only when it is empty or carries the marker of the same kind; anything else
(a non-empty folder of the user's, ``--out .``, a file) is refused with a typed error, ``--overwrite`` or not:

    >>> check_destination(Path("runs/demo"), "demo", overwrite=True)      # absent, empty or a demo folder: fine

Files are built in a temporary directory beside the destination and renamed into place (``replace_dir``), so a
failure leaves nothing half-written. ``tempfile`` makes that directory 0700 and its files 0600; ``share_tree``
gives everything the modes a plain ``open`` / ``mkdir`` would have under the caller's umask (0644 / 0755 under
umask 022), executables keeping their execute bits.

Stdlib only (the device side imports it).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from edgevlm.errors import EdgeVLMError, OutputError

__all__ = ["MARKER", "KINDS", "umask", "share_tree", "mark", "kind_of", "check_destination", "replace_dir",
           "temp_dir_beside"]

MARKER = ".edgevlm-output.json"
#: What each kind is called in messages.
KINDS = {"demo": "demo output folder", "train": "training run folder", "dataset": "synthetic dataset",
         "checkpoint": "checkpoint written by edgevlm", "bench": "benchmark output folder"}


def umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status), else by a set/reset."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share_tree(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have under this umask:
    folders ``0o777 & ~umask``, files ``0o666 & ~umask``, files with an execute bit ``0o777 & ~umask``. For trees
    built with ``tempfile`` (0700 folders, 0600 files) before they are renamed into place. Symlinks are left alone."""
    mask = umask()
    root = Path(root)

    def fix(p: Path, is_dir: bool) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        if is_dir or st.st_mode & 0o111:
            want = 0o777 & ~mask
        else:
            want = 0o666 & ~mask
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)

    fix(root, root.is_dir())
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                fix(Path(dirpath) / d, True)
            for f in filenames:
                fix(Path(dirpath) / f, False)


def mark(folder: str | os.PathLike, kind: str) -> None:
    """Write the marker that lets a later run of the same verb reuse or replace ``folder``."""
    from edgevlm import __version__

    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(folder) / MARKER
    path.write_text(json.dumps({"kind": kind, "edgevlm": __version__}) + "\n")


def kind_of(folder: str | os.PathLike) -> str | None:
    """The kind in ``folder``'s marker, or None (no marker, unreadable, not a folder)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in KINDS else None


def check_destination(dest: str | os.PathLike, kind: str, *, overwrite: bool,
                      error: type[EdgeVLMError] = OutputError, flag: str = "--overwrite") -> bool:
    """Whether ``dest`` may be written as a ``kind`` folder; True when it holds an earlier one to replace.

    Absent or empty: fine. A folder marked ``kind``: fine with ``overwrite``, else ``error`` naming ``flag``.
    Anything else (a file, a symlink, a folder without the marker): ``error``, whatever ``overwrite`` says.
    """
    dest = Path(dest)
    what = KINDS[kind]
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise error(f"'{dest}' exists and is not a folder; choose another --out")
    if not dest.exists() or not any(dest.iterdir()):
        return False
    found = kind_of(dest)
    if found != kind:
        held = f"a {KINDS[found]}" if found else "not written by edgevlm"
        raise error(f"'{dest}' exists and is not a {what} ({held}); refusing to replace it (it may hold your "
                    f"data). Choose another --out, or empty or remove that folder yourself")
    if not overwrite:
        raise error(f"'{dest}' already holds a {what}; pass {flag} to replace it or choose another --out")
    return True


def temp_dir_beside(dest: str | os.PathLike) -> Path:
    """A new private temp folder next to ``dest`` (same file system, so ``replace_dir`` is a rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished folder ``src`` to ``dst`` with umask modes (``share_tree``). An existing ``dst`` (checked
    by the caller with ``check_destination``) is moved aside first and deleted only after the rename, so a failure
    leaves the old one in place."""
    src, dst = Path(src), Path(dst)
    share_tree(src)
    if dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()
    if not dst.exists():
        os.rename(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old)                                  # onto the empty temp dir (POSIX rename semantics)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
