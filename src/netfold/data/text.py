"""Text corpora for language-model calibration and perplexity: the Python documentation, files.

The Python documentation sources (Debian package ``python3.11-doc``, PSF licence) are real
English prose with code, available offline. netfold uses a fixed split by directory, so the
calibration text never overlaps the evaluation text:

- ``"eval"``: every ``tutorial/*.rst.txt`` file (sorted by name), about 290 kB;
- ``"calibration"``: every ``howto/*.rst.txt`` file (sorted by name), about 730 kB.

Files of one split are joined with ``"\\n\\n"`` (the WikiText protocol of the pruning papers).
WikiText-2 is used through ``datasets`` when it is reachable (:func:`load_text` ``"wikitext2"``).

    from netfold.data.text import load_text
    text = load_text("pydocs")                      # evaluation split
    calib = load_text("pydocs", split="calibration")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
SPLIT_DIRS = {"eval": "tutorial", "calibration": "howto"}


def pydocs_root() -> Path:
    """The documentation sources folder (``$NETFOLD_PYDOCS`` overrides the Debian path)."""
    return Path(os.environ.get("NETFOLD_PYDOCS", str(PYDOCS_ROOT)))


def pydocs_files(split: str = "eval") -> list[Path]:
    """The sorted ``.rst.txt`` files of one split ("eval" or "calibration")."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_DIRS)}")
    folder = pydocs_root() / SPLIT_DIRS[split]
    files = sorted(folder.glob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(
            f"no Python documentation under {folder}: install it with "
            "`apt-get install python3.11-doc` (or `make data`), or set NETFOLD_PYDOCS"
        )
    return files


def load_pydocs(split: str = "eval") -> str:
    """The text of one split of the Python docs corpus, files joined by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in pydocs_files(split))


def load_wikitext2(split: str = "test") -> str:
    """WikiText-2 (raw) through ``datasets``; raises RuntimeError when it cannot be reached."""
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001 - no network, no datasets, no cache
        raise RuntimeError(f"WikiText-2 is not reachable here ({type(e).__name__}: {e})") from e
    return "\n\n".join(ds["text"])


def load_text(source: str, split: str = "eval") -> str:
    """Text from ``"pydocs"``, ``"wikitext2"`` or a path to a UTF-8 text file.

    Args:
        source: corpus name or file path.
        split: "eval" or "calibration" (for WikiText-2: test / train).
    """
    if source == "pydocs":
        return load_pydocs(split)
    if source == "wikitext2":
        return load_wikitext2("test" if split == "eval" else "train")
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"{source!r} is neither 'pydocs', 'wikitext2' nor a text file")
    return p.read_text(encoding="utf-8")


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of a token stream, tail dropped.

    Args:
        ids: (T,) token ids.
        seqlen: window length.
        max_windows: keep only the first this many windows (None: all).

    Returns:
        (n_windows, seqlen) int64.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens: fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen).long()


def calibration_windows(
    tokenizer, seqlen: int = 512, n: int = 16, source: str = "pydocs"
) -> torch.Tensor:
    """The first ``n`` windows of ``seqlen`` tokens of the calibration split: (n, seqlen)."""
    ids = tokenizer(load_text(source, "calibration"), return_tensors="pt").input_ids[0]
    return token_windows(ids, seqlen, n)
