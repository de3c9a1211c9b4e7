"""MNIST + Fashion-MNIST: finding, verifying and loading the files; splits; on-device pair mixing.

The task: a network sees ``x = (digit + fashion) / 2`` and must return both sources. Everything
here serves that with three guarantees:

* **Right bytes or a clear error.** Every file is checked against the canonical MD5 of its
  *decompressed* content (gzip wrappers differ between mirrors, the payload does not), and every
  problem -- missing, truncated, corrupt, wrong file -- is a one-line :class:`DataError` that
  names the file and says how to fix it.
* **Offline first.** Files are looked up in an explicit folder, ``$BSS_DATA_DIR``, the per-user
  cache and Debian's package folder before anything is downloaded; a download streams into a
  temp file and is only renamed into place once verified, so a dead connection never leaves a
  half file that a later run would trust.
* **Test data stays sealed.** :func:`load_splits` carves validation out of the *training* sets
  only; the test sets are read by :func:`load_test`, which only final evaluation calls.

Training-time sampling (:class:`PairSampler`) keeps both image sets on the training device as
uint8 and draws and mixes pairs there with a device-side generator: no DataLoader, no host work
and no host-device copies per step, and the generator state is checkpointable for exact resume.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from bss_model.config import DataConfig
from bss_model.errors import CheckpointError, DataError, one_line
from bss_model.io import atomic_write

log = logging.getLogger("bss")

# --------------------------------------------------------------------------------------
# What the datasets are and where they live

DATASETS = ("mnist", "fashion-mnist")

# The canonical file stems; on disk each may be gzipped (``stem.gz``) or raw (``stem``).
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# MD5 of the *decompressed* bytes: the published checksums. Verifying the payload rather than
# the .gz lets any mirror's (or a user's own) gzip wrapper pass, and a raw copy too.
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# Public mirrors serving ``<stem>.gz`` (the original yann.lecun.com host now refuses bots).
MIRRORS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# ``apt-get install dataset-fashion-mnist`` puts the files here; MNIST has no such package.
DEBIAN_DIRS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third magic byte) -> big-endian numpy dtype, per the format's definition.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_REFETCH = "delete it and re-download / provide a good copy"


def _check_dataset(dataset: str) -> None:
    # Dataset names come from code, not from users, so a bad one is a programming error.
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {DATASETS}")


# --------------------------------------------------------------------------------------
# Reading IDX files


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Decode IDX bytes into a writable, native-endian array; ``name`` labels errors.

    Layout: two zero bytes, a type code, the number of dimensions, that many big-endian uint32
    sizes, then the data, row-major. Anything that does not add up exactly is rejected, because a
    short or padded file means a broken download, and silently reshaping it would train on junk.
    """
    if len(raw) < 4:
        raise DataError(f"{name}: truncated: {len(raw)} bytes, too short for an IDX header; re-download it")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        hint = " (this is gzip data: decompress it first)" if raw[:2] == _GZIP_MAGIC else ""
        raise DataError(
            f"{name}: wrong magic number 0x{magic:08x}{hint}; expected an IDX file (0x0000080N, e.g. 0x00000803 "
            "for images) -- re-download it"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{name}: truncated: the header needs {header} bytes for {ndim} dimensions but the file has {len(raw)}; "
            "re-download it"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = header + dtype.itemsize * math.prod(dims)  # Python ints: no overflow on absurd headers
    shape = "x".join(map(str, dims))
    if len(raw) < expected:
        raise DataError(
            f"{name}: truncated: a {shape} IDX file needs {expected} bytes but only {len(raw)} were found; "
            "re-download it"
        )
    if len(raw) > expected:
        raise DataError(
            f"{name}: {len(raw) - expected} bytes of trailing garbage after the {shape} data "
            f"(expected {expected} bytes, found {len(raw)}); re-download it"
        )
    # frombuffer is zero-copy over the (read-only) bytes; astype to native order makes one writable
    # copy, which callers (torch.from_numpy, in-place ops) need anyway.
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _decompress(raw: bytes, name: str | Path) -> bytes:
    """Gunzip ``raw`` if it is gzip (by magic bytes: suffixes lie), else return it unchanged."""
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # EOFError: cut short; BadGzipFile/zlib.error: damaged
        raise DataError(f"{name} is a truncated or corrupt gzip file ({one_line(exc)}); {_REFETCH}") from None


def _check_md5(content: bytes, expected_md5: str, name: str | Path, fix: str = _REFETCH) -> None:
    found = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if found != expected_md5.lower():
        raise DataError(f"checksum mismatch for {name}: expected {expected_md5}, found {found}; {fix}")


def read_idx(path: Path, expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file, gzipped or raw, optionally checking the MD5 of its decompressed bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; provide the file or let the project download it") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    content = _decompress(raw, path)
    # Parse before checking the checksum: "truncated: needs N bytes, found M" says more than a bare
    # mismatch, and a file that parses but mismatches (say, MNIST where Fashion belongs) still fails below.
    array = parse_idx(content, str(path))
    if expected_md5 is not None:
        _check_md5(content, expected_md5, path)
    return array


# --------------------------------------------------------------------------------------
# Finding (and, if allowed, downloading) the files


def cache_dir() -> Path:
    """Where downloads go: ``$BSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/bss-search/data``, else ``~/.cache/...``."""
    if explicit := os.environ.get("BSS_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")  # the XDG spec says an empty value means "unset"
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bss-search" / "data"


def _existing_root(root: str, what: str) -> Path:
    # A root the user named must exist: silently falling through to the cache or a download
    # would hide a typo in the path until much later (or forever, if a cached copy exists).
    path = Path(root).expanduser()
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"{what} {path} {problem}: point data.dir / --data-dir / BSS_DATA_DIR at a folder holding mnist/ "
            "and fashion-mnist/"
        )
    return path


def candidate_dirs(dataset: str, data_dir: str | None) -> list[Path]:
    """Folders searched for ``dataset``'s files, most explicit first, without duplicates."""
    _check_dataset(dataset)
    dirs: list[Path] = []
    if data_dir:
        dirs.append(_existing_root(data_dir, "data dir") / dataset)
    if env := os.environ.get("BSS_DATA_DIR"):
        dirs.append(_existing_root(env, "data dir (BSS_DATA_DIR)") / dataset)
    dirs.append(cache_dir() / dataset)
    if dataset in DEBIAN_DIRS:
        dirs.append(Path(DEBIAN_DIRS[dataset]))
    return list(dict.fromkeys(dirs))  # ordered de-duplication: data.dir and BSS_DATA_DIR often agree


def _how_to_provide(dataset: str) -> str:
    fix = (
        "set BSS_DATA_DIR (or data.dir / --data-dir) to a folder holding mnist/ and fashion-mnist/ with the four "
        f"IDX files each (.gz or uncompressed), or put them in {cache_dir() / dataset}"
    )
    if dataset in DEBIAN_DIRS:
        fix += f", or run `apt-get install dataset-{dataset}` (installs into {DEBIAN_DIRS[dataset]})"
    return fix


def find_file(dataset: str, stem: str, data_dir: str | None, download: bool) -> Path:
    """Path of ``stem`` (gzipped or raw) for ``dataset``; downloads it into the cache if allowed and missing."""
    if stem not in FILES:
        raise ValueError(f"unknown file {stem!r}: expected one of {FILES}")
    dirs = candidate_dirs(dataset, data_dir)
    for folder in dirs:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    missing = f"{stem}(.gz) for {dataset} not found in any of: {', '.join(map(str, dirs))}"
    if not download:
        raise DataError(
            f"{missing}; downloading is off (data.download=false): {_how_to_provide(dataset)}, "
            "or allow downloading (data.download=true)"
        )
    url = MIRRORS[dataset] + stem + ".gz"
    dest = cache_dir() / dataset / (stem + ".gz")
    log.info("downloading %s -> %s", url, dest)
    try:
        download_file(url, dest, MD5[dataset][stem])
    except DataError as exc:
        raise DataError(one_line(f"{missing}; {exc}: {_how_to_provide(dataset)}")) from None
    return dest


def download_file(url: str, dest: Path, expected_md5: str, timeout: float = 60) -> None:
    """Fetch ``url`` to ``dest``, verified, atomically: ``dest`` is either absent or a good file.

    The bytes stream into a temp file beside ``dest`` (same filesystem, so the final rename is
    atomic); the checksum of the decompressed content is checked before the rename, and any failure
    removes the temp file. Concurrent processes (parallel trials) downloading the same file are
    safe: each renames a complete, verified file over the same name.
    """
    dest = Path(dest)

    def fetch(out: IO[bytes]) -> None:
        chunks = []  # kept for the checksum: ~30 MB at most, cheaper than re-reading the temp file
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                chunks.append(chunk)
        content = _decompress(b"".join(chunks), url)
        _check_md5(content, expected_md5, url, fix="the mirror served a bad copy; try again later or provide the file")

    try:
        atomic_write(dest, fetch)  # unlinks the temp file on any exception, DataError included
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError covers URLError/HTTPError/timeouts and disk errors; HTTPException a cut-off body
        # (IncompleteRead); ValueError a malformed URL.
        reason = one_line(exc) or type(exc).__name__
        raise DataError(f"downloading {url} failed ({reason})") from None


# --------------------------------------------------------------------------------------
# Loading


def _load_images(dataset: str, split: str, data_dir: str | None, download: bool) -> np.ndarray:
    """One split's images (uint8 [N, 28, 28]), with images and labels both MD5-verified.

    Labels are read although only images are used: their count must match the image count, which
    catches a mismatched pair of files, and verifying all four files keeps the check uniform.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    image_stem, label_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    image_path = find_file(dataset, image_stem, data_dir, download)
    images = read_idx(image_path, MD5[dataset][image_stem])
    label_path = find_file(dataset, label_stem, data_dir, download)
    labels = read_idx(label_path, MD5[dataset][label_stem])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path} holds {images.dtype} {list(images.shape)}, expected uint8 [N, 28, 28]; {_REFETCH}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{label_path} holds {labels.shape[0]} labels but {image_path} holds {images.shape[0]} images: "
            f"the two files do not belong together; {_REFETCH}"
        )
    return images


def load_dataset(dataset: str, data_dir: str | None = None, download: bool = True) -> dict[str, np.ndarray]:
    """``{"train": uint8 [60000, 28, 28], "test": uint8 [10000, 28, 28]}`` for ``dataset``, all files verified."""
    _check_dataset(dataset)
    return {split: _load_images(dataset, split, data_dir, download) for split in ("train", "test")}


def pad32(images: np.ndarray) -> np.ndarray:
    """Zero-pad uint8 [N, 28, 28] to [N, 32, 32] (2 pixels each side), so 32 = 2**5 halves cleanly per U-Net level."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"pad32 expects [N, 28, 28] images, got {list(images.shape)}")
    # One allocation and one strided copy (~25% faster than np.pad on 60k images).
    out = np.zeros((images.shape[0], 32, 32), dtype=images.dtype)
    out[:, 2:30, 2:30] = images
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` sorted index arrays; val is the first ``round(n * val_fraction)`` of a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    # Sorted so slicing the image arrays walks memory in order and the result is easy to compare.
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class Splits:
    """Training and validation images, uint8 [N, 32, 32]: MNIST digits and Fashion-MNIST items."""

    train_digit: np.ndarray
    train_fashion: np.ndarray
    val_digit: np.ndarray
    val_fashion: np.ndarray


def load_splits(cfg: DataConfig) -> Splits:
    """Train/val splits of both *training* sets; the test files are never opened here."""
    data_dir = cfg.dir or None
    parts: dict[str, np.ndarray] = {}
    for key, dataset in (("digit", "mnist"), ("fashion", "fashion-mnist")):
        images = pad32(_load_images(dataset, "train", data_dir, cfg.download))
        train_idx, val_idx = split_indices(len(images), cfg.val_fraction, cfg.split_seed)
        # take() rather than images[idx]: numpy's fancy indexing over a 3-D array is ~9x slower here.
        parts[f"train_{key}"], parts[f"val_{key}"] = images.take(train_idx, axis=0), images.take(val_idx, axis=0)
    return Splits(**parts)


def load_test(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Padded uint8 test sets ``(mnist, fashion)``, for the final evaluation only."""
    data_dir = cfg.dir or None
    mnist, fashion = (pad32(_load_images(dataset, "test", data_dir, cfg.download)) for dataset in DATASETS)
    return mnist, fashion


# --------------------------------------------------------------------------------------
# Mixing and sampling


def draw_from(rng: np.random.Generator, n_digit: int, n_fashion: int, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The one way pairs are drawn: uniform with replacement, ``idx_digit`` then ``idx_fashion``, each
    ``rng.integers(0, n, n_pairs)``. Validation pairs, the protocol's draws (``bss_model.evaluate``) and the
    demo pairs of ``bss-separate`` all come from here.

    The draw order is part of the evaluation protocol: changing it changes every reported score.
    """
    idx_digit = rng.integers(0, n_digit, n_pairs)
    idx_fashion = rng.integers(0, n_fashion, n_pairs)
    return idx_digit, idx_fashion


def draw_pairs(n_digit: int, n_fashion: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` seeded pairs from a generator of their own (:func:`draw_from`)."""
    return draw_from(np.random.default_rng(seed), n_digit, n_fashion, n_pairs)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (``/ 255``); floating input is taken as already in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"to_unit expects uint8 or floating images, got {images.dtype}")


def mix(digit: torch.Tensor, fashion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference mixing: ``x = (digit + fashion) / 2`` as [B, 1, H, W], ``target = (digit, fashion)`` as
    [B, 2, H, W].

    Channel 0 of the target is the digit, channel 1 the fashion item; both float32 in [0, 1]. No other
    preprocessing (no normalisation, no augmentation): reported MSEs are on this exact scale.
    """
    if digit.shape != fashion.shape or digit.ndim != 3:
        raise ValueError(
            f"mix expects two [B, H, W] batches of the same shape, got {list(digit.shape)} and {list(fashion.shape)}"
        )
    target = torch.stack((to_unit(digit), to_unit(fashion)), dim=1)
    x = (target[:, 0:1] + target[:, 1:2]) / 2  # /2 is exact in float, so x is bit-for-bit the channel mean
    return x, target


class PairSampler:
    """Fresh uniform random (digit, fashion) pairs per step, drawn and mixed on the training device.

    Both image sets live on the device as uint8 (~55 MB each for 54k images at 32x32), a quarter of float32's
    footprint; indexing and conversion happen there, so a step costs a few small kernels and no
    host work. The generator also lives on the device (a CPU generator would force a host-side
    draw and copy per step), and its state is saved with checkpoints for exact resume.
    """

    def __init__(
        self,
        digit: np.ndarray | torch.Tensor,
        fashion: np.ndarray | torch.Tensor,
        device: torch.device | str,
        seed: int,
    ):
        self.digit = self._to_device(digit, "digit", device)
        self.fashion = self._to_device(fashion, "fashion", device)
        self.device = self.digit.device  # normalised: "cuda" becomes cuda:N, matching the generator's device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @staticmethod
    def _to_device(images: np.ndarray | torch.Tensor, name: str, device: torch.device | str) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if tensor.dtype != torch.uint8 or tensor.ndim != 3 or len(tensor) == 0:
            raise ValueError(
                f"PairSampler: {name} must be non-empty uint8 [N, H, W], got {tensor.dtype} {list(tensor.shape)}"
            )
        return tensor.to(device).contiguous()

    def draw_indices(self, idx_digit: torch.Tensor, idx_fashion: torch.Tensor) -> None:
        """Fill two preallocated index buffers with fresh uniform draws (digit first, then fashion).

        In place, so a captured training step can keep reading the same buffers.
        """
        torch.randint(0, len(self.digit), idx_digit.shape, generator=self.generator, device=self.device, out=idx_digit)
        torch.randint(
            0, len(self.fashion), idx_fashion.shape, generator=self.generator, device=self.device, out=idx_fashion
        )

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, target)`` for ``batch_size`` fresh pairs, as :func:`mix` returns them."""
        idx_digit = torch.empty(batch_size, dtype=torch.long, device=self.device)
        idx_fashion = torch.empty(batch_size, dtype=torch.long, device=self.device)
        self.draw_indices(idx_digit, idx_fashion)
        return mix(self.digit[idx_digit], self.fashion[idx_fashion])

    def state_dict(self) -> dict:
        # get_state() is a CPU ByteTensor for CPU and CUDA generators alike, so checkpoints load anywhere.
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.set_state(state["generator"].cpu())
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            # RuntimeError: a state from another generator type (e.g. a CPU run resumed on CUDA).
            raise CheckpointError(
                f"the checkpoint's pair-sampler state does not fit this sampler on {self.device} ({one_line(exc)}): "
                "resume on the same kind of device it was saved from"
            ) from None
