"""Fashion-MNIST (Xiao et al., 2017) from the original IDX files.

Where the files are looked for, in order:

1. the ``root`` argument,
2. the directory in ``$NETFOLD_DATA``,
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``),
4. ``~/.cache/netfold/data`` (where a previous torchvision download landed).

Each directory may hold the files directly or under ``FashionMNIST/raw`` (torchvision's
layout), gzipped (``*.gz``) or not. If none is found, the standard loader
``torchvision.datasets.FashionMNIST(download=True)`` is tried into ``~/.cache/netfold/data``;
offline that fails and a :class:`FileNotFoundError` says to
``apt-get install dataset-fashion-mnist``.

Images are zero-padded (black background, as in the data) from 28x28 to ``pad_to`` x ``pad_to``
pixels so that CIFAR-style networks (five 2x2 poolings) apply unchanged, then normalised with
the train split's statistics *of the padded image*: :data:`MEAN_28` and :data:`STD_28` were
computed once on the 60,000 unpadded train images (pixels scaled to [0, 1]); zero padding only
dilutes the first two moments by ``28**2 / pad_to**2``, so :func:`normalization` gives the exact
padded mean and std, and the normalised train split has mean 0 and std 1 for every ``pad_to``.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "CALIBRATION_SEED",
    "CLASSES",
    "MEAN_28",
    "STD_28",
    "augment_batch",
    "background_value",
    "calibration_batches",
    "fashion_mnist_loaders",
    "iterate_batches",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "normalization",
]

#: Mean of the 60,000 train images (28x28, pixels in [0, 1]); computed in float64.
MEAN_28 = 0.2860405969887955
#: Standard deviation (population) of the same pixels.
STD_28 = 0.35302424451492254
#: Default seed of the fixed calibration subset (see :func:`calibration_batches`).
CALIBRATION_SEED = 0

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "netfold" / "data"

_IMAGE_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABEL_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000), "t10k": ("t10k", 10000)}
_RAW_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def normalization(pad_to: int = 32) -> tuple[float, float]:
    """Mean and std of the train split after zero-padding 28x28 images to ``pad_to``.

    Args:
        pad_to: side of the padded image (>= 28).

    Returns:
        ``(mean, std)`` of the padded train pixels in [0, 1] units.
    """
    if pad_to < 28:
        raise ValueError(f"pad_to must be >= 28, got {pad_to}")
    frac = 28 * 28 / (pad_to * pad_to)
    mean = MEAN_28 * frac
    second_moment = (STD_28**2 + MEAN_28**2) * frac
    return mean, math.sqrt(second_moment - mean * mean)


def background_value(pad_to: int = 32) -> float:
    """The normalised value of a black (0) pixel; use it as fill when padding normalised images."""
    mean, std = normalization(pad_to)
    return -mean / std


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get("NETFOLD_DATA")
    if env:
        bases.append(Path(env).expanduser())
    bases += [SYSTEM_DIR, CACHE_DIR]
    out: list[Path] = []
    for b in bases:
        for d in (b, b / "fashion-mnist", b / "FashionMNIST" / "raw"):
            if d not in out:
                out.append(d)
    return out


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """Return the first directory holding all four Fashion-MNIST IDX files, or ``None``.

    Args:
        root: a directory searched before ``$NETFOLD_DATA`` and the system locations.
    """
    stems = [
        f"{p}-{kind}"
        for p in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    for d in _candidate_dirs(root):
        if all(_find_file(d, s) is not None for s in stems):
            return d
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be an IDX file")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number {got} (expected {magic})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim  # 16 for images, 8 for labels
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(
            f"{path}: expected {count} bytes of data for shape {dims}, got {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _download_with_torchvision() -> Path:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(CACHE_DIR), train=True, download=True)
        FashionMNIST(str(CACHE_DIR), train=False, download=True)
    except Exception as exc:  # offline, no torchvision, mirror down ...
        raise FileNotFoundError(
            "Fashion-MNIST not found (looked in root, $NETFOLD_DATA, /usr/share/datasets/fashion-mnist, "
            f"{CACHE_DIR}) and the torchvision download failed ({type(exc).__name__}: {exc}). "
            "Install it with `apt-get install -y dataset-fashion-mnist` or point $NETFOLD_DATA at a "
            "directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
        ) from exc
    return CACHE_DIR / "FashionMNIST" / "raw"


def _load_raw(split: str, root: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test' (alias 't10k')")
    prefix, expected = _SPLITS[split]
    directory = find_fashion_mnist(root)
    if directory is None:
        directory = _download_with_torchvision()
    key = (str(directory.resolve()), prefix)
    if key not in _RAW_CACHE:
        img_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
        lab_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
        if img_path is None or lab_path is None:
            raise FileNotFoundError(f"Fashion-MNIST {prefix} files missing in {directory}")
        images = _read_idx(img_path, _IMAGE_MAGIC)
        labels = _read_idx(lab_path, _LABEL_MAGIC)
        if images.shape != (expected, 28, 28) or labels.shape != (expected,):
            raise ValueError(
                f"{directory}: unexpected shapes images {images.shape}, labels {labels.shape} for {split}"
            )
        _RAW_CACHE[key] = (
            torch.from_numpy(images.copy()),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return _RAW_CACHE[key]


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, pad_to: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST as normalised tensors.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` / ``"t10k"`` (10,000 images).
        root: directory searched first for the IDX files (see the module docstring).
        pad_to: images are zero-padded (centred) from 28x28 to ``pad_to`` x ``pad_to``.

    Returns:
        ``(images, labels)``: images ``(N, 1, pad_to, pad_to)`` float32, normalised so that the
        train split has mean 0 and std 1; labels ``(N,)`` int64 in ``[0, 9]``.

    Raises:
        FileNotFoundError: the files are nowhere and cannot be downloaded.
        ValueError: a file is not a valid Fashion-MNIST IDX file.
    """
    raw, labels = _load_raw(split, root)
    return _to_float(raw, pad_to), labels.clone()


def _to_float(raw: torch.Tensor, pad_to: int) -> torch.Tensor:
    """``(N, 28, 28)`` uint8 -> ``(N, 1, pad_to, pad_to)`` float32, padded and normalised."""
    mean, std = normalization(pad_to)
    pad = pad_to - 28
    images = raw.to(torch.float32).div_(255.0).unsqueeze(1)
    if pad:
        before = pad // 2
        images = torch.nn.functional.pad(images, (before, pad - before, before, pad - before))
    return images.sub_(mean).div_(std).contiguous()


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
    fill: float | None = None,
) -> torch.Tensor:
    """Random crop with padding and random horizontal flip, vectorised over a batch.

    Args:
        images: ``(N, C, H, W)`` normalised images.
        generator: source of randomness (CPU generator), for a reproducible data order.
        padding: pixels of padding on each side before the random ``H x W`` crop.
        flip: also flip each image horizontally with probability 1/2.
        fill: value of the padding; default :func:`background_value` for 32x32 images, i.e.
            the normalised black background.

    Returns:
        ``(N, C, H, W)`` augmented images (a new tensor).
    """
    n, c, h, w = images.shape
    if fill is None:
        fill = background_value(h) if h == w and h >= 28 else 0.0
    dev = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4, value=fill)
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = oy[:, None] + torch.arange(h, device=dev)[None, :]  # (N, H)
        cols = ox[:, None] + torch.arange(w, device=dev)[None, :]  # (N, W)
        idx_n = torch.arange(n, device=dev)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
        out = out.permute(0, 3, 1, 2).contiguous()
    else:
        out = images.clone()
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        out[mask] = out[mask].flip(-1)
    return out


def fashion_mnist_loaders(
    batch_size: int = 128,
    *,
    root: str | os.PathLike | None = None,
    pad_to: int = 32,
    seed: int = 0,
    train_subset: int | None = None,
    eval_batch_size: int = 512,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders over in-memory tensors.

    The train loader shuffles with a ``torch.Generator`` seeded by ``seed`` (deterministic data
    order); augmentation is left to the caller (:func:`augment_batch`), which is much faster on
    whole batches than per-sample transforms.

    Args:
        batch_size: train batch size.
        root: see :func:`load_fashion_mnist`.
        pad_to: see :func:`load_fashion_mnist`.
        seed: seeds the shuffling and the choice of ``train_subset``.
        train_subset: if set, train on this many images drawn (seeded) from the train split.
        eval_batch_size: test batch size.
        num_workers: DataLoader workers (0 = in-process, best for in-memory tensors).

    Returns:
        ``(train_loader, test_loader)`` yielding ``(images (B, 1, pad_to, pad_to), labels (B,))``.
    """
    x_train, y_train = load_fashion_mnist("train", root, pad_to)
    if train_subset is not None and train_subset < len(y_train):
        idx = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))[
            :train_subset
        ]
        x_train, y_train = x_train[idx], y_train[idx]
    x_test, y_test = load_fashion_mnist("test", root, pad_to)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=batch_size,
        shuffle=True,
        generator=g,
        drop_last=True,
        num_workers=num_workers,
    )
    test = DataLoader(
        TensorDataset(x_test, y_test),
        batch_size=eval_batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    return train, test


def calibration_batches(
    n_batches: int = 8,
    batch_size: int = 64,
    seed: int = CALIBRATION_SEED,
    *,
    root: str | os.PathLike | None = None,
    pad_to: int = 32,
    with_labels: bool = False,
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed calibration subset of the TRAIN split (for REPAIR with data).

    The subset is the first ``n_batches * batch_size`` indices of
    ``torch.randperm(60000, generator=torch.Generator().manual_seed(seed))``, split into
    consecutive batches; no augmentation. The same arguments always give the same images, and
    the test split is never touched, so accuracy measured on it stays unbiased.

    Args:
        n_batches: number of batches.
        batch_size: images per batch.
        seed: selects the subset.
        root: see :func:`load_fashion_mnist`.
        pad_to: see :func:`load_fashion_mnist`.
        with_labels: also return the labels.

    Returns:
        A list of ``n_batches`` image tensors ``(batch_size, 1, pad_to, pad_to)``, or of
        ``(images, labels (batch_size,))`` pairs when ``with_labels``.
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError("n_batches and batch_size must be >= 1")
    raw, y = _load_raw("train", root)
    total = n_batches * batch_size
    if total > len(y):
        raise ValueError(f"asked for {total} calibration images, the train split has {len(y)}")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:total]
    xs, ys = _to_float(raw[idx], pad_to).split(batch_size), y[idx].split(batch_size)
    if with_labels:
        return [(a.contiguous(), b.contiguous()) for a, b in zip(xs, ys)]
    return [a.contiguous() for a in xs]


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield consecutive ``(images, labels)`` slices of at most ``batch_size``."""
    for i in range(0, len(labels), batch_size):
        yield images[i : i + batch_size], labels[i : i + batch_size]
