"""Crash-safe writes: single files (results, metadata JSON) and whole save folders.

Files: :func:`write_bytes` / :func:`write_text` / :func:`write_json` write a temporary sibling
(``.NAME.<random>.tmp``), fsync it, ``os.replace`` it over ``NAME`` and fsync the folder, so a
reader sees the old complete file or the new complete one, never a prefix.

Folders (:func:`atomic_directory`), the protocol behind :func:`netfold.save`:

1. ``recover(path)`` repairs what an earlier crash left (below).
2. Everything is written into a fresh sibling ``.NAME.netfold-tmp-<pid>-<random>``; every file
   and the folder itself are fsynced.
3. If ``path`` exists it is renamed to ``.NAME.netfold-old-<pid>-<random>``; then the new folder is
   renamed to ``path`` and the parent folder is fsynced; then the old folder is deleted.

A crash (even SIGKILL / power loss after the fsyncs) can therefore leave:

- a stale ``netfold-tmp`` sibling: an unfinished new save, deleted by :func:`recover`;
- ``path`` missing with a ``netfold-old`` sibling (killed between the two renames of step 3):
  :func:`recover` renames the old save back, so ``path`` holds the old complete save;
- ``path`` present with a ``netfold-old`` sibling (killed before the deletion): the new save is
  complete, the old sibling is deleted.

:func:`netfold.load` and every save run :func:`recover` first, so at every instant a reader sees
``path`` holding either the old complete save or the new complete one. Siblings of a process
that is still running (its pid is in the name) are left alone, so two processes saving
different folders never interfere. The protocol assumes a POSIX file system where ``rename``
within one folder is atomic (ext4, xfs, APFS, tmpfs); it is not meant for network shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "fsync_dir",
    "recover",
    "write_bytes",
    "write_json",
    "write_text",
]

TMP_TAG = ".netfold-tmp-"
OLD_TAG = ".netfold-old-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename / new entry inside it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_via(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` by calling ``write(tmp_name)`` then fsync + rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data`` (parent folders are created)."""
    p = Path(path)
    _write_via(p, lambda t: Path(t).write_bytes(data))
    return p


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, **kw: Any) -> Path:
    """Atomically write ``obj`` as JSON (``json.dumps`` keyword arguments pass through).

    The object is serialised before anything is written, so an unserialisable ``obj`` raises
    TypeError and leaves ``path`` untouched. A trailing newline is added.
    """
    text = json.dumps(obj, indent=indent, **kw) + "\n"
    return write_text(path, text)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling_pid(name: str, tag: str) -> int | None:
    try:
        return int(name.split(tag, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _stale(name: str, tag: str) -> bool:
    """A sibling whose owning process is gone (or whose name carries no pid)."""
    pid = _sibling_pid(name, tag)
    return pid is None or not _pid_alive(pid)


def _siblings(path: Path, tag: str) -> list[Path]:
    prefix = f".{path.name}{tag}"
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))


def recover(path: str | os.PathLike) -> None:
    """Finish or roll back a folder swap that a crash interrupted (see the module docstring).

    Siblings owned by a live process are skipped (a save in progress elsewhere).
    """
    path = Path(path)
    olds = [p for p in _siblings(path, OLD_TAG) if _stale(p.name, OLD_TAG)]
    if not path.exists() and olds:
        # killed between "path -> old" and "new -> path": the old save is the complete one
        os.replace(olds[-1], path)
        fsync_dir(path.parent)
        olds = olds[:-1]
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    for p in _siblings(path, TMP_TAG):
        if _stale(p.name, TMP_TAG):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fp = os.path.join(dirpath, f)
            if os.path.islink(fp):
                continue
            with open(fp, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, replaceable: Callable[[Path], str | None] | None = None
) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then swap it in at ``path`` (module docstring).

    Args:
        path: the final folder.
        replaceable: called with ``path`` when it exists; returns ``None`` when the existing
            folder may be replaced, else the reason it may not (raised as ValueError before
            anything is written).

    Yields:
        The temporary folder to write into. On an exception inside the ``with`` block the
        temporary folder is deleted and ``path`` is left as it was.

    Raises:
        ValueError: ``path`` exists and is not a folder, or ``replaceable`` refuses it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"directory {path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.is_dir() and replaceable is not None:
        why = replaceable(path)
        if why:
            raise ValueError(f"directory {path}: {why}")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}{TMP_TAG}{token}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}{OLD_TAG}{token}")
        had_old = path.exists()
        if had_old:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if had_old:
                os.replace(old, path)
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
