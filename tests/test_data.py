"""Tests for bss_model.data: IDX parsing, verification, lookup/download, splits, mixing, sampling.

Everything runs offline: an autouse fixture points the download cache at a fresh temp folder and
makes ``urlopen`` refuse anything but ``file://`` URLs, so no test can reach (or need) the network
and none writes to the real per-user cache. Real data comes from ``BSS_DATA_DIR`` (see conftest).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from bss_model import data
from bss_model.config import DataConfig
from bss_model.errors import BssError, CheckpointError, DataError

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = data.FILES

# --------------------------------------------------------------------------------------
# Helpers and fixtures

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C}
_CODES |= {np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file, independently of the code under test."""
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def write_gz_idx(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as a gzipped IDX file; return the MD5 of its decompressed content."""
    raw = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw))
    return md5(raw)


@pytest.fixture(autouse=True)
def sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh empty download cache per test, and no network: only file:// URLs open."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BSS_CACHE_DIR", str(cache))
    real_urlopen = urllib.request.urlopen

    def offline_urlopen(url, *args, **kwargs):  # urlopen's own loose signature
        target = url if isinstance(url, str) else url.full_url
        if not target.startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sandbox: Path) -> Path:
    """No BSS_DATA_DIR and a Debian folder that cannot exist: only paths a test names are searched."""
    monkeypatch.delenv("BSS_DATA_DIR", raising=False)
    monkeypatch.setitem(data.DEBIAN_DIRS, "fashion-mnist", str(tmp_path / "no-debian" / "fashion-mnist"))
    return sandbox


@pytest.fixture(scope="module")
def real(data_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Both real datasets, loaded (and MD5-verified) once for the module."""
    return {ds: data.load_dataset(ds, str(data_dir), download=False) for ds in data.DATASETS}


# --------------------------------------------------------------------------------------
# parse_idx


def test_parse_idx_tiny_uint8() -> None:
    raw = b"\x00\x00\x08\x03" + struct.pack(">III", 3, 2, 2) + bytes(range(12))
    out = data.parse_idx(raw, "tiny")
    assert out.dtype == np.uint8 and out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out, np.arange(12, dtype=np.uint8).reshape(3, 2, 2))
    out[0, 0, 0] = 7  # callers may modify the result in place
    assert out[0, 0, 0] == 7


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_parse_idx_other_codes_big_endian(dtype: type) -> None:
    values = np.array([[-3, 1, 2], [300, -400, 5]] if dtype != np.int8 else [[-3, 1, 2], [100, -100, 5]], dtype=dtype)
    out = data.parse_idx(idx_bytes(values), "multi")
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    "header",
    [
        b"\x01\x00\x08\x01",  # first byte not zero
        b"\x00\x00\x07\x01",  # unknown type code
        b"\x00\x00\x08\x00",  # zero dimensions
        b"\x1f\x8b\x08\x00",  # gzip data handed over without decompressing
    ],
)
def test_parse_idx_wrong_magic(header: bytes) -> None:
    with pytest.raises(DataError, match="magic") as info:
        data.parse_idx(header + b"\x00" * 8, "some-file")
    assert "some-file" in str(info.value)
    assert f"0x{header.hex()}" in str(info.value)


def test_parse_idx_truncated_data_reports_expected_and_found() -> None:
    raw = idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-5]  # 16 header + 12 data, 5 missing
    with pytest.raises(DataError, match="truncated") as info:
        data.parse_idx(raw, "cut")
    assert "cut" in str(info.value) and "28" in str(info.value) and "23" in str(info.value)


@pytest.mark.parametrize("raw", [b"\x00\x00", b"\x00\x00\x08\x03" + struct.pack(">I", 3)])
def test_parse_idx_truncated_header(raw: bytes) -> None:
    with pytest.raises(DataError, match="truncated"):
        data.parse_idx(raw, "short")


def test_parse_idx_trailing_garbage() -> None:
    with pytest.raises(DataError, match="trailing") as info:
        data.parse_idx(idx_bytes(np.zeros((2, 2), np.uint8)) + b"junk", "padded")
    assert "padded" in str(info.value)


# --------------------------------------------------------------------------------------
# read_idx


def test_real_datasets_load_with_canonical_shapes(real: dict[str, dict[str, np.ndarray]]) -> None:
    for ds in data.DATASETS:
        assert real[ds]["train"].shape == (60000, 28, 28) and real[ds]["train"].dtype == np.uint8
        assert real[ds]["test"].shape == (10000, 28, 28) and real[ds]["test"].dtype == np.uint8
        assert real[ds]["train"].max() == 255 and real[ds]["train"].min() == 0
    # The two datasets really are different files.
    assert not np.array_equal(real["mnist"]["test"], real["fashion-mnist"]["test"])


@pytest.mark.parametrize("ds", data.DATASETS)
def test_read_idx_real_labels_verified(data_dir: Path, ds: str) -> None:
    labels = data.read_idx(data_dir / ds / f"{TRAIN_LABELS}.gz", data.MD5[ds][TRAIN_LABELS])
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_read_idx_detects_gzip_by_magic_not_suffix(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "mnist" / f"{TEST_IMAGES}.gz"
    expected = data.MD5["mnist"][TEST_IMAGES]
    raw_copy = tmp_path / "raw-but-named.gz"  # uncompressed content behind a .gz name
    raw_copy.write_bytes(gzip.decompress(src.read_bytes()))
    gz_copy = tmp_path / "gzip-but-named.bin"
    shutil.copyfile(src, gz_copy)
    from_raw = data.read_idx(raw_copy, expected)
    from_gz = data.read_idx(gz_copy, expected)
    assert from_raw.shape == (10000, 28, 28)
    assert np.array_equal(from_raw, from_gz)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_read_idx_damaged_gzip_names_the_file(data_dir: Path, tmp_path: Path, damage: str) -> None:
    blob = bytearray((data_dir / "mnist" / f"{TEST_IMAGES}.gz").read_bytes())
    if damage == "truncate":
        blob = blob[:100_000]
    else:
        blob[5000:5100] = bytes(100)  # zeros in the middle of the deflate stream
    bad = tmp_path / f"{TEST_IMAGES}.gz"
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError) as info:
        data.read_idx(bad, data.MD5["mnist"][TEST_IMAGES])
    message = str(info.value)
    assert str(bad) in message
    assert "gzip" in message or "checksum" in message  # zeros may still inflate, but never to the right bytes


def test_read_idx_checksum_mismatch_reports_both_md5s(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    found = write_gz_idx(path, np.array([1, 2, 3], np.uint8))  # a valid IDX gz, just not the right one
    expected = data.MD5["mnist"][TEST_LABELS]
    with pytest.raises(DataError, match="checksum mismatch") as info:
        data.read_idx(path, expected)
    message = str(info.value)
    assert str(path) in message and f"expected {expected}" in message and f"found {found}" in message
    # Without an expected checksum the same file reads fine.
    np.testing.assert_array_equal(data.read_idx(path), [1, 2, 3])


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        data.read_idx(tmp_path / "nope.gz")


# --------------------------------------------------------------------------------------
# cache_dir, candidate_dirs, find_file


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BSS_CACHE_DIR")
    assert data.cache_dir() == tmp_path / "xdg" / "bss-search" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "bss-search" / "data"


def test_candidate_dirs_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: Path) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("BSS_DATA_DIR", str(env))
    debian = Path(data.DEBIAN_DIRS["fashion-mnist"])
    assert data.candidate_dirs("fashion-mnist", str(explicit)) == [
        explicit / "fashion-mnist",
        env / "fashion-mnist",
        offline / "fashion-mnist",
        debian,
    ]
    assert data.candidate_dirs("mnist", None) == [env / "mnist", offline / "mnist"]
    # The same root given twice is searched once.
    assert data.candidate_dirs("mnist", str(env)) == [env / "mnist", offline / "mnist"]


def test_missing_data_dir_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        data.candidate_dirs("mnist", str(tmp_path / "typo"))
    assert str(tmp_path / "typo") in str(info.value) and "BSS_DATA_DIR" in str(info.value)
    monkeypatch.setenv("BSS_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="does not exist") as info:
        data.find_file("mnist", TRAIN_IMAGES, None, download=False)
    assert str(tmp_path / "gone") in str(info.value)


@pytest.mark.parametrize("name", [f"{TEST_LABELS}.gz", TEST_LABELS])
def test_find_file_gz_or_raw(tmp_path: Path, offline: Path, name: str) -> None:
    (tmp_path / "root" / "mnist").mkdir(parents=True)
    (tmp_path / "root" / "mnist" / name).write_bytes(b"x")
    assert (
        data.find_file("mnist", TEST_LABELS, str(tmp_path / "root"), download=False)
        == tmp_path / "root" / "mnist" / name
    )


@pytest.mark.parametrize("ds", data.DATASETS)
def test_missing_files_offline_lists_every_place(tmp_path: Path, offline: Path, ds: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        data.find_file(ds, TRAIN_IMAGES, str(empty), download=False)
    message = str(info.value)
    assert TRAIN_IMAGES in message and "BSS_DATA_DIR" in message and "download" in message
    for place in data.candidate_dirs(ds, str(empty)):
        assert str(place) in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (ds == "fashion-mnist")
    assert not any(offline.rglob("*"))  # nothing was fetched


def test_load_dataset_offline_without_files_raises(tmp_path: Path, offline: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        data.load_dataset("mnist", str(tmp_path), download=False)


def test_find_file_download_failure_is_one_line_with_url(tmp_path: Path, offline: Path) -> None:
    with pytest.raises(DataError) as info:
        data.find_file("mnist", TRAIN_LABELS, str(tmp_path), download=True)
    message = str(info.value)
    assert "\n" not in message
    assert data.MIRRORS["mnist"] + TRAIN_LABELS + ".gz" in message
    assert "network disabled in tests" in message
    assert str(tmp_path / "mnist") in message and str(offline / "mnist") in message
    assert not (offline / "mnist" / f"{TRAIN_LABELS}.gz").exists()


def test_find_file_downloads_into_cache(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path, offline: Path
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(data_dir / "mnist" / f"{TEST_LABELS}.gz", mirror / f"{TEST_LABELS}.gz")
    monkeypatch.setitem(data.MIRRORS, "mnist", mirror.as_uri() + "/")
    path = data.find_file("mnist", TEST_LABELS, None, download=True)
    assert path == offline / "mnist" / f"{TEST_LABELS}.gz"
    assert data.read_idx(path, data.MD5["mnist"][TEST_LABELS]).shape == (10000,)
    # A second lookup finds the cached copy (the mirror is gone now).
    shutil.rmtree(mirror)
    assert data.find_file("mnist", TEST_LABELS, None, download=True) == path


# --------------------------------------------------------------------------------------
# download_file


def test_download_file_verifies_and_places(tmp_path: Path) -> None:
    src = tmp_path / "src" / "tiny.gz"
    digest = write_gz_idx(src, np.arange(6, dtype=np.uint8).reshape(2, 3))
    dest = tmp_path / "cache" / "sub" / "tiny.gz"
    data.download_file(src.as_uri(), dest, digest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.gz"]  # no temp files left behind


def test_download_file_bad_checksum_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gz"
    write_gz_idx(src, np.arange(6, dtype=np.uint8))
    dest = tmp_path / "cache" / "tiny.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        data.download_file(src.as_uri(), dest, "0" * 32)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_file_failure_keeps_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "tiny.gz"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))[:20])
    with pytest.raises(DataError, match="gzip"):
        data.download_file(truncated.as_uri(), dest, "0" * 32)
    with pytest.raises(DataError, match="failed") as info:
        data.download_file((tmp_path / "absent.gz").as_uri(), dest, "0" * 32)
    assert "absent.gz" in str(info.value)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.gz"]


# --------------------------------------------------------------------------------------
# load_dataset on tiny fake files (checksums patched to match them)


def _fake_dataset(root: Path, monkeypatch: pytest.MonkeyPatch, n_train: int, n_train_labels: int) -> None:
    arrays = {
        TRAIN_IMAGES: np.full((n_train, 28, 28), 7, np.uint8),
        TRAIN_LABELS: np.arange(n_train_labels, dtype=np.uint8),
        TEST_IMAGES: np.full((3, 28, 28), 9, np.uint8),
        TEST_LABELS: np.arange(3, dtype=np.uint8),
    }
    digests = {stem: write_gz_idx(root / "mnist" / f"{stem}.gz", array) for stem, array in arrays.items()}
    monkeypatch.setitem(data.MD5, "mnist", digests)


def test_load_dataset_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: Path) -> None:
    _fake_dataset(tmp_path, monkeypatch, n_train=5, n_train_labels=5)
    out = data.load_dataset("mnist", str(tmp_path), download=False)
    assert set(out) == {"train", "test"}
    assert out["train"].shape == (5, 28, 28) and (out["train"] == 7).all()
    assert out["test"].shape == (3, 28, 28) and (out["test"] == 9).all()


def test_load_dataset_label_count_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: Path) -> None:
    _fake_dataset(tmp_path, monkeypatch, n_train=5, n_train_labels=4)
    with pytest.raises(DataError, match="4 labels") as info:
        data.load_dataset("mnist", str(tmp_path), download=False)
    assert str(tmp_path / "mnist" / f"{TRAIN_LABELS}.gz") in str(info.value)


def test_data_error_is_user_facing() -> None:
    assert issubclass(DataError, BssError)


# --------------------------------------------------------------------------------------
# pad32, to_unit, mix, draw_pairs


def test_pad32() -> None:
    images = np.random.default_rng(0).integers(1, 256, (4, 28, 28), dtype=np.uint8)  # no zeros inside
    out = data.pad32(images)
    assert out.shape == (4, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 2:30, 2:30], images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (out[:, border] == 0).all()
    with pytest.raises(ValueError):
        data.pad32(np.zeros((4, 32, 32), np.uint8))


def test_to_unit() -> None:
    out = data.to_unit(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(TypeError):
        data.to_unit(torch.tensor([1, 2], dtype=torch.int64))


def test_mix_is_the_mean_of_the_targets() -> None:
    rng = np.random.default_rng(1)
    a = torch.from_numpy(data.pad32(rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)))
    b = torch.from_numpy(data.pad32(rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)))
    x, target = data.mix(a, b)
    assert x.shape == (5, 1, 32, 32) and target.shape == (5, 2, 32, 32)
    assert x.dtype == torch.float32 and target.dtype == torch.float32
    assert torch.equal(target[:, 0], a.float() / 255) and torch.equal(target[:, 1], b.float() / 255)
    assert torch.equal(x[:, 0], (target[:, 0] + target[:, 1]) / 2)
    torch.testing.assert_close(x, target.mean(dim=1, keepdim=True), rtol=0, atol=0)
    assert x.min() >= 0 and x.max() <= 1 and target.min() >= 0 and target.max() <= 1
    assert float(x.max()) > 0.5  # really on the [0, 1] scale, not accidentally /255 twice
    assert (x[..., :2, :] == 0).all() and (x[..., :, -2:] == 0).all()  # padding stays exactly zero
    # Float input already in [0, 1] mixes identically.
    x2, target2 = data.mix(a.float() / 255, b.double() / 255)
    assert torch.equal(x2, x) and torch.equal(target2, target)
    with pytest.raises(ValueError):
        data.mix(a, b[:3])


def test_draw_pairs() -> None:
    idx_digit, idx_fashion = data.draw_pairs(10, 7, 1000, seed=3)
    rng = np.random.default_rng(3)  # the documented protocol, spelled out
    np.testing.assert_array_equal(idx_digit, rng.integers(0, 10, 1000))
    np.testing.assert_array_equal(idx_fashion, rng.integers(0, 7, 1000))
    assert set(idx_digit.tolist()) == set(range(10)) and set(idx_fashion.tolist()) == set(range(7))
    again = data.draw_pairs(10, 7, 1000, seed=3)
    assert np.array_equal(again[0], idx_digit) and np.array_equal(again[1], idx_fashion)
    assert not np.array_equal(data.draw_pairs(10, 7, 1000, seed=4)[0], idx_digit)


# --------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize(("n", "fraction"), [(60000, 0.1), (1000, 0.25), (7, 0.5), (3, 0.01)])
def test_split_indices(n: int, fraction: float) -> None:
    train, val = data.split_indices(n, fraction, seed=1234)
    assert len(val) == round(n * fraction) and len(train) == n - len(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))  # disjoint and covering
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted
    again = data.split_indices(n, fraction, seed=1234)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


def test_split_indices_seed_matters() -> None:
    assert not np.array_equal(data.split_indices(1000, 0.1, 1)[1], data.split_indices(1000, 0.1, 2)[1])


def test_load_splits_uses_train_files_only(
    data_dir: Path, tmp_path: Path, offline: Path, real: dict[str, dict[str, np.ndarray]]
) -> None:
    # A data dir holding only the training files: load_splits must not need the test files.
    for ds in data.DATASETS:
        (tmp_path / ds).mkdir()
        for stem in (TRAIN_IMAGES, TRAIN_LABELS):
            (tmp_path / ds / f"{stem}.gz").symlink_to(data_dir / ds / f"{stem}.gz")
    cfg = DataConfig(dir=str(tmp_path), download=False, val_fraction=0.1, split_seed=1234)
    splits = data.load_splits(cfg)
    train_idx, val_idx = data.split_indices(60000, 0.1, 1234)
    for key, ds in (("digit", "mnist"), ("fashion", "fashion-mnist")):
        train, val = getattr(splits, f"train_{key}"), getattr(splits, f"val_{key}")
        assert train.shape == (54000, 32, 32) and val.shape == (6000, 32, 32)
        assert train.dtype == np.uint8 and val.dtype == np.uint8
        padded = data.pad32(real[ds]["train"])
        # np.array_equal, not assert_array_equal: the latter takes seconds on arrays this size.
        assert np.array_equal(val, padded[val_idx]) and np.array_equal(train, padded[train_idx])
    # ...and the test sets really are absent there, so load_test fails, naming what is missing.
    with pytest.raises(DataError, match=TEST_IMAGES):
        data.load_test(cfg)


def test_load_test(data_dir: Path, real: dict[str, dict[str, np.ndarray]]) -> None:
    mnist, fashion = data.load_test(DataConfig(dir=str(data_dir), download=False))
    assert mnist.shape == fashion.shape == (10000, 32, 32)
    assert np.array_equal(mnist, data.pad32(real["mnist"]["test"]))
    assert np.array_equal(fashion, data.pad32(real["fashion-mnist"]["test"]))


# --------------------------------------------------------------------------------------
# PairSampler

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _constant_sets() -> tuple[np.ndarray, np.ndarray]:
    # Image i of a is all i; image j of b is all 100 + j: every sample reveals which pair it came from.
    a = np.repeat(np.arange(10, dtype=np.uint8), 32 * 32).reshape(10, 32, 32)
    b = np.repeat(np.arange(100, 107, dtype=np.uint8), 32 * 32).reshape(7, 32, 32)
    return a, b


@pytest.mark.parametrize("device", _DEVICES)
def test_pair_sampler_draws_valid_mixtures(device: str) -> None:
    a, b = _constant_sets()
    sampler = data.PairSampler(a, torch.from_numpy(b), device, seed=0)
    x, target = sampler.sample(256)
    assert x.shape == (256, 1, 32, 32) and target.shape == (256, 2, 32, 32)
    assert x.device.type == device and target.dtype == torch.float32
    pixel_a = (target[:, 0] * 255).round().to(torch.int64).cpu()
    pixel_b = (target[:, 1] * 255).round().to(torch.int64).cpu()
    assert (pixel_a == pixel_a[:, :1, :1]).all() and (pixel_b == pixel_b[:, :1, :1]).all()  # whole images
    assert set(pixel_a[:, 0, 0].tolist()) == set(range(10))  # uniform over all of a...
    assert set(pixel_b[:, 0, 0].tolist()) == set(range(100, 107))  # ...and of b
    assert torch.equal(x[:, 0], (target[:, 0] + target[:, 1]) / 2)


@pytest.mark.parametrize("device", _DEVICES)
def test_pair_sampler_reproducible_and_resumable(device: str) -> None:
    a, b = _constant_sets()
    first, second = data.PairSampler(a, b, device, seed=5), data.PairSampler(a, b, device, seed=5)
    for _ in range(3):
        assert torch.equal(first.sample(64)[1], second.sample(64)[1])
    other = data.PairSampler(a, b, device, seed=6)
    assert not torch.equal(other.sample(64)[1], first.sample(64)[1])

    state = first.state_dict()
    assert state["generator"].dtype == torch.uint8 and state["generator"].device.type == "cpu"
    expected = [first.sample(32) for _ in range(3)]
    resumed = data.PairSampler(a, b, device, seed=999)  # seed is irrelevant once state is loaded
    resumed.load_state_dict(state)
    for x_ref, t_ref in expected:
        x, t = resumed.sample(32)
        assert torch.equal(x, x_ref) and torch.equal(t, t_ref)


def test_pair_sampler_rejects_bad_state_and_inputs() -> None:
    a, b = _constant_sets()
    sampler = data.PairSampler(a, b, "cpu", seed=0)
    with pytest.raises(CheckpointError):
        sampler.load_state_dict({})
    with pytest.raises(CheckpointError):
        sampler.load_state_dict({"generator": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError):
        data.PairSampler(a.astype(np.float32), b, "cpu", seed=0)
