"""Atomic writes: a crash (or a kill) at any moment leaves the old version or the new one, never
a half-written file or folder.

    atomic_write(path, write)       write(tmp) a temp file beside `path`, fsync, rename over it
    atomic_write_text(path, text)
    atomic_write_dir(folder, write) write(tmp) a `folder.tmp`, then swap it in (`folder.old` in between)
    usual_permissions(path)         0666 / 0777 less the umask (mkstemp and mkdtemp make 0600 / 0700)

Part of the ground floor (with common/errors.py): imports nothing of this project.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: str | Path) -> None:
    """Give `path` the permissions a plain open() / mkdir() would: 0666 (files) or 0777 (folders)
    less the umask, instead of mkstemp's 0600 or mkdtemp's 0700."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temp file beside `path`, fsync it, then rename over `path`.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        usual_permissions(tmp)  # (after: a writer may have made the file anew)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        _fsync(path.parent)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via `write(tmp)`, then swap it in: a crash leaves the old or the new one
    (as `final`, or as `final.tmp` / `final.old` between the two renames: see find_checkpoint)."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder must not look like a checkpoint
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
