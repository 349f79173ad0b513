"""What every benchmark records beside its numbers: command, git revision, machine, load.

Benchmarks under ``benchmarks/`` write results JSON through :func:`write_result`, with a header
from :func:`header` (the command that produced the file, the git revision, and the machine:
CPU model, cores, load average, torch version and threads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..eval.latency import cpu_model, machine_info

__all__ = [
    "command",
    "cpu_model",
    "finish",
    "git_commit",
    "git_dirty",
    "git_revision",
    "header",
    "loadavg",
    "machine",
    "write_result",
]


def _git(*args: str) -> str:
    return subprocess.check_output(["git", *args], text=True, stderr=subprocess.DEVNULL).strip()


def git_commit(short: bool = False) -> str:
    """The checked-out commit hash (abbreviated with ``short``), or "unknown" outside a checkout."""
    try:
        return _git("rev-parse", *(["--short"] if short else []), "HEAD") or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty(ignore: tuple[str, ...] = ()) -> bool:
    """True when tracked files have uncommitted changes, apart from paths ending in ``ignore``
    (a benchmark's own outputs); False outside a checkout."""
    try:
        lines = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return False
    return any(not ln.endswith(ignore) for ln in lines) if ignore else bool(lines)


def git_revision(short: bool = False) -> str:
    """The checked-out commit (``+dirty`` when it has uncommitted changes), or "unknown".

    Args:
        short: the abbreviated hash.
    """
    rev = git_commit(short)
    return rev if rev == "unknown" else rev + ("+dirty" if git_dirty() else "")


def loadavg() -> list[float] | None:
    """The 1 / 5 / 15-minute load averages (None where the platform has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, load, library versions and date (:func:`netfold.eval.latency.machine_info`),
    plus torch's thread count, the load at start and ``extra``."""
    info = machine_info()
    info.update(torch_threads=torch.get_num_threads(), loadavg_start=loadavg(), **extra)
    return info


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this script: ``python SCRIPT ARGS`` (``argv``: sys.argv)."""
    return " ".join(["python", *(sys.argv if argv is None else argv)])


def header(**fields: Any) -> dict[str, Any]:
    """The start of a results JSON: command, git revision, machine, then ``fields``."""
    return {
        "command": command(),
        "git_revision": git_revision(),
        "machine": machine(),
        **fields,
    }


def finish(results: dict[str, Any]) -> dict[str, Any]:
    """Record the load at the end in ``results["machine"]`` (in place); returns ``results``."""
    results.setdefault("machine", {})["loadavg_end"] = loadavg()
    return results


def write_result(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``results`` as JSON atomically (:func:`netfold.atomic.write_json`); missing
    ``command`` / ``git_revision`` / ``machine`` entries are filled in first."""
    for key, value in (("command", command), ("git_revision", git_revision), ("machine", machine)):
        if key not in results:
            results[key] = value()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, results)
