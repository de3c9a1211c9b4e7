"""Tests for bss_model.separate (``bss-separate``): a real tiny model, trained for a few steps on the real data,
applied to images of every accepted kind; outputs checked against an independent numpy/torch computation;
every bad input refused with one line, exit 2 and nothing written.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bss_model import checkpoint as ckpt
from bss_model.config import DataConfig, load_config
from bss_model.data import load_test, pad32
from bss_model.separate import figures, main, pad_geometry
from bss_model.train import train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as vendored by pip (in every venv)
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_file(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``best_model.pt`` as the search writes it (config + weights + extras), from 150 real training steps,
    so the outputs are real separations rather than the near-zero output of an untrained net."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        [f"data.dir={data_dir}", "data.download=false", "data.val_pairs=200", "model.variant=tiny",
         "train.device=cpu", "train.threads=1", "train.precision=fp32", "train.tensorboard=false",
         "train.batch_size=32", "train.epochs=1", "train.samples_per_epoch=4800", "eval.batch_size=200"],
    )  # fmt: skip
    assert train(cfg, out_dir=run).status == "completed"
    state = ckpt.load(run / "checkpoint" / ckpt.FILENAME)
    best = run / "best_model.pt"
    ckpt.save({"config": state["config"], "model": state["model"], "epoch": 1, "seed": 0, "val_mse": 0.0}, best)
    return best


@pytest.fixture(scope="module")
def net(model_file: Path) -> torch.nn.Module:
    model, _ = ckpt.load_model(model_file)
    return model.eval()


def forward(net: torch.nn.Module, padded: np.ndarray) -> np.ndarray:
    """The model on one padded float image, in plain fp32 (the CLI runs channels_last), clamped like the outputs."""
    with torch.no_grad():
        return net(torch.from_numpy(padded.astype(np.float32))[None, None])[0].clamp(0, 1).numpy()


def expected_28(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> [2, 28, 28]: padded by training's own pad32, cropped back."""
    padded = pad32(pixels[None])[0].astype(np.float32) / 255
    return forward(net, padded)[:, 2:30, 2:30]


def to_u8(a: np.ndarray) -> np.ndarray:
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


def assert_png_close(path: Path, expected: np.ndarray) -> None:
    """8-bit output vs the expected floats: channels_last vs contiguous may move a value across a rounding edge."""
    got = read_png(path)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    diff = np.abs(got.astype(int) - to_u8(expected).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def mixture(seed: int, h: int = 28, w: int = 28) -> np.ndarray:
    """A uint8 image with shapes on black: two seeded rectangles averaged, like (digit + fashion) / 2."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(2):
        part = np.zeros((h, w))
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        part[top : top + h // 2, left : left + w // 3] = rng.uniform(0.5, 1)
        parts.append(part)
    return np.round((parts[0] + parts[1]) / 2 * 255).astype(np.uint8)


def separate(capsys: pytest.CaptureFixture, model_file: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    try:
        code = main(["--checkpoint", str(model_file), "--threads", "1", *args])
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------
# Pure pieces


def test_pad_geometry() -> None:
    assert pad_geometry(28, 28, 2) == ((2, 2, 2, 2), False)  # training's pad32, whatever the depth
    assert pad_geometry(28, 28, 5) == ((2, 2, 2, 2), False)
    assert pad_geometry(32, 32, 5) == ((0, 0, 0, 0), False)
    # 37 -> 40 and 45 -> 48 for depth 2 (multiples of 4), the odd pixel at the bottom / right.
    assert pad_geometry(37, 45, 2) == ((1, 2, 1, 2), True)
    assert pad_geometry(37, 45, 3) == ((1, 2, 1, 2), True)  # 40 and 48 are multiples of 8 too
    assert pad_geometry(37, 45, 4) == ((5, 6, 1, 2), True)  # 48 x 48
    assert pad_geometry(64, 20, 2) == ((0, 0, 0, 0), True)  # fits, but is not what the model was trained on
    assert pad_geometry(1, 1, 1) == ((0, 1, 0, 1), True)


def test_figures_on_tiny_arrays() -> None:
    x = np.array([[0.5, 0.25]])
    digit = np.array([[1.0, 0.0]])
    fashion = np.array([[0.0, 0.0]])
    f = figures(x, digit, fashion)
    # (digit + fashion) / 2 = [0.5, 0]: errors 0 and 0.25 -> mean of squares 0.03125.
    assert f["consistency_mse"] == pytest.approx(0.03125)
    assert (f["mean_input"], f["mean_digit"], f["mean_fashion"]) == pytest.approx((0.375, 0.5, 0.0))
    truth = (np.array([[1.0, 0.5]]), np.array([[0.0, 0.0]]))
    f = figures(x, digit, fashion, truth)
    assert f["mse_digit"] == pytest.approx(0.125)  # (0 + 0.25) / 2
    assert f["mse_fashion"] == 0
    assert f["mse"] == pytest.approx(0.0625)
    # Mix baseline: x vs digit (0.25 + 0.0625) / 2, x vs fashion (0.25 + 0.0625) / 2.
    assert f["baseline_mix_mse"] == pytest.approx(0.15625)


# --------------------------------------------------------------------------------------
# Images in, separations out


def test_28x28_png_round_trip(tmp_path: Path, capsys, model_file: Path, net) -> None:
    pixels = mixture(0)
    src = save_png(tmp_path / "mix.png", pixels)
    out = tmp_path / "out"
    code, stdout, stderr = separate(capsys, model_file, str(src), "--out", str(out))
    assert code == 0, stderr
    assert stderr == ""  # 28x28 grayscale: exactly the training geometry, nothing to notice
    assert sorted(listing(out)) == ["mix.digit.png", "mix.fashion.png", "panel.png"]
    want = expected_28(net, pixels)
    assert_png_close(out / "mix.digit.png", want[0])
    assert_png_close(out / "mix.fashion.png", want[1])
    assert want[0].std() > 0.01 and want[1].std() > 0.01  # real images, not a blank that matches anything
    assert str(out / "mix.digit.png") in stdout and str(out / "panel.png") in stdout
    assert not list(out.glob(".*"))  # no temp files left behind


def test_32x32_is_used_as_is(tmp_path: Path, capsys, model_file: Path, net) -> None:
    pixels = mixture(1, 32, 32)
    src = save_png(tmp_path / "big.png", pixels)
    code, _, stderr = separate(capsys, model_file, str(src), "--out", str(tmp_path / "out"))
    assert code == 0 and stderr == ""
    want = forward(net, pixels.astype(np.float32) / 255)
    assert_png_close(tmp_path / "out" / "big.digit.png", want[0])
    assert_png_close(tmp_path / "out" / "big.fashion.png", want[1])


def test_odd_size_is_padded_to_the_depth_and_cropped_back(tmp_path: Path, capsys, model_file: Path, net) -> None:
    pixels = mixture(2, 37, 45)  # 45 wide, 37 high
    src = save_png(tmp_path / "odd.png", pixels)
    code, _, stderr = separate(capsys, model_file, str(src), "--out", str(tmp_path / "out"))
    assert code == 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "45x37" in lines[0] and "48x40" in lines[0] and "32x32" in lines[0]
    # tiny has depth 2: padded to multiples of 4, 37 -> 40 (1 above, 2 below), 45 -> 48 (1 left, 2 right).
    padded = np.pad(pixels.astype(np.float32) / 255, ((1, 2), (1, 2)))
    want = forward(net, padded)[:, 1:38, 1:46]
    for name, component in (("digit", want[0]), ("fashion", want[1])):
        assert read_png(tmp_path / "out" / f"odd.{name}.png").shape == (37, 45)
        assert_png_close(tmp_path / "out" / f"odd.{name}.png", component)


def test_rgb_and_rgba_are_converted_with_a_notice(tmp_path: Path, capsys, model_file: Path, net) -> None:
    rng = np.random.default_rng(3)
    rgb = np.stack([mixture(3), mixture(4), mixture(5)], axis=-1)
    save_png(tmp_path / "colour.png", rgb)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)], axis=-1)
    save_png(tmp_path / "alpha.png", rgba)
    code, _, stderr = separate(
        capsys, model_file, str(tmp_path / "colour.png"), str(tmp_path / "alpha.png"), "--out", str(tmp_path / "o")
    )
    assert code == 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 2
    assert "colour.png is RGB: converted to grayscale" in lines[0]
    assert "alpha.png is RGBA: converted to grayscale (alpha dropped)" in lines[1]
    # Grayscale is ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000, as Pillow rounds it.
    luma = (rgb.astype(np.int64) @ np.array([299, 587, 114]) + 500) // 1000
    assert np.abs(luma - np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.int64)).max() <= 1
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    want = expected_28(net, gray)
    for stem in ("colour", "alpha"):  # the alpha channel is ignored: same pixels, same separation
        assert_png_close(tmp_path / "o" / f"{stem}.digit.png", want[0])


def test_npy_float_and_uint8(tmp_path: Path, capsys, model_file: Path, net) -> None:
    pixels = mixture(6)
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "f32.npy", pixels.astype(np.float32) / 255)
    np.save(tmp_path / "f64.npy", pixels.astype(np.float64) / 255)
    save_png(tmp_path / "png.png", pixels)
    args = [str(tmp_path / n) for n in ("u8.npy", "f32.npy", "f64.npy", "png.png")]
    code, _, stderr = separate(capsys, model_file, *args, "--out", str(tmp_path / "out"), "--json")
    assert code == 0, stderr
    out = tmp_path / "out"
    want = expected_28(net, pixels)
    for stem in ("u8", "f32", "f64", "png"):
        assert_png_close(out / f"{stem}.digit.png", want[0])
        assert_png_close(out / f"{stem}.fashion.png", want[1])
    # The same pixels in four encodings are one input to the model: identical outputs, byte for byte.
    for stem in ("f32", "f64", "png"):
        assert (out / f"{stem}.digit.png").read_bytes() == (out / "u8.digit.png").read_bytes()


def test_bmp_and_jpeg(tmp_path: Path, capsys, model_file: Path, net) -> None:
    pixels = mixture(22)
    save_png(tmp_path / "p.png", pixels)
    Image.fromarray(pixels).save(tmp_path / "b.bmp")
    Image.fromarray(pixels).save(tmp_path / "j.jpg", quality=95)
    # A camera JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"): 20 wide, 28 high
    # as stored, 28 wide and 20 high as seen.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = mixture(23, 28, 20)
    Image.fromarray(stored).save(tmp_path / "cam.jpg", quality=95, exif=exif)
    args = [str(tmp_path / n) for n in ("p.png", "b.bmp", "j.jpg", "cam.jpg")]
    code, _, stderr = separate(capsys, model_file, *args, "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    out = tmp_path / "out"
    assert (out / "b.digit.png").read_bytes() == (out / "p.digit.png").read_bytes()  # BMP is lossless
    jpeg_seen = np.asarray(Image.open(tmp_path / "j.jpg"))
    assert np.abs(jpeg_seen.astype(int) - pixels).max() > 0  # JPEG is lossy: its own pixels are the input
    assert_png_close(out / "j.digit.png", expected_28(net, jpeg_seen)[0])
    assert read_png(out / "cam.digit.png").shape == (20, 28)
    assert "cam.jpg is 28x20" in stderr  # the notice names the size as seen


def test_json_figures_match_numpy(tmp_path: Path, capsys, model_file: Path, net) -> None:
    a, b = mixture(7), mixture(8)
    save_png(tmp_path / "a.png", a)
    np.save(tmp_path / "b.npy", b)
    code, stdout, _ = separate(capsys, model_file, str(tmp_path / "a.png"), str(tmp_path / "b.npy"),
                               "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert code == 0
    doc = json.loads(stdout)
    assert doc["panel"] == str(tmp_path / "out" / "panel.png") and (tmp_path / "out" / "panel.png").is_file()
    assert [r["input"] for r in doc["images"]] == [str(tmp_path / "a.png"), str(tmp_path / "b.npy")]
    assert "demo" not in doc
    for row, pixels in zip(doc["images"], (a, b), strict=True):
        x = pixels.astype(np.float64) / 255
        digit, fashion = expected_28(net, pixels).astype(np.float64)
        assert (row["height"], row["width"]) == (28, 28)
        assert row["consistency_mse"] == pytest.approx(np.mean(((digit + fashion) / 2 - x) ** 2), rel=1e-4, abs=1e-7)
        assert row["mean_input"] == pytest.approx(x.mean(), rel=1e-6)
        assert row["mean_digit"] == pytest.approx(digit.mean(), rel=1e-4)
        assert row["mean_fashion"] == pytest.approx(fashion.mean(), rel=1e-4)
        assert "mse" not in row  # no truth for the user's own images
        assert Path(row["digit"]).is_file() and Path(row["fashion"]).is_file()


def test_demo_writes_test_mixtures_and_scores_them_against_the_truth(
    tmp_path: Path, capsys, model_file: Path, net, data_dir: Path
) -> None:
    n, seed = 4, 3
    out = tmp_path / "demo"
    code, stdout, stderr = separate(
        capsys, model_file, "--demo", str(n), "--seed", str(seed), "--data-dir", str(data_dir), "--out", str(out),
        "--json",
    )  # fmt: skip
    assert code == 0, stderr
    doc = json.loads(stdout)
    # The documented draw: one generator, per demo a digit index then a fashion index, over the 10k test images.
    rng = np.random.default_rng(seed)
    pairs = [(rng.integers(0, 10000), rng.integers(0, 10000)) for _ in range(n)]
    idx_digit, idx_fashion = [p[0] for p in pairs], [p[1] for p in pairs]
    test_digit, test_fashion = load_test(DataConfig(dir=str(data_dir), download=False))
    mses, baselines = [], []
    for k in range(n):
        stem = f"demo-{k:03d}"
        raw_digit, raw_fashion = test_digit[idx_digit[k], 2:30, 2:30], test_fashion[idx_fashion[k], 2:30, 2:30]
        # The true components are the dataset's own 28x28 pixels, unchanged.
        assert np.array_equal(read_png(out / f"{stem}.true-digit.png"), raw_digit)
        assert np.array_equal(read_png(out / f"{stem}.true-fashion.png"), raw_fashion)
        d, f = raw_digit.astype(np.float64) / 255, raw_fashion.astype(np.float64) / 255
        x = (d + f) / 2
        assert np.abs(read_png(out / f"{stem}.png").astype(int) - np.round(x * 255)).max() <= 1
        pred = forward(net, np.pad(x, 2))[:, 2:30, 2:30].astype(np.float64)
        assert_png_close(out / f"{stem}.digit.png", pred[0])
        mse = (np.mean((pred[0] - d) ** 2) + np.mean((pred[1] - f) ** 2)) / 2
        baseline = (np.mean((x - d) ** 2) + np.mean((x - f) ** 2)) / 2
        row = doc["images"][k]
        assert row["input"] == stem
        assert row["mse"] == pytest.approx(mse, rel=1e-4)
        assert row["baseline_mix_mse"] == pytest.approx(baseline, rel=1e-6)
        mses.append(mse)
        baselines.append(baseline)
    assert doc["demo"]["n"] == n and doc["demo"]["seed"] == seed
    assert doc["demo"]["mse"] == pytest.approx(np.mean(mses), rel=1e-4)
    assert doc["demo"]["baseline_mix_mse"] == pytest.approx(np.mean(baselines), rel=1e-6)
    assert len(listing(out)) == 5 * n + 1  # mixture, 2 truths, 2 outputs per demo, and the panel
    # A smaller N draws the same first pairs: demo-k does not depend on N.
    code, _, _ = separate(capsys, model_file, "--demo", "2", "--seed", str(seed), "--data-dir", str(data_dir),
                          "--out", str(tmp_path / "two"))  # fmt: skip
    assert code == 0
    for k in range(2):
        for suffix in ("png", "true-digit.png", "true-fashion.png", "digit.png"):
            name = f"demo-{k:03d}.{suffix}"
            assert (tmp_path / "two" / name).read_bytes() == (out / name).read_bytes()


def test_panel_holds_a_row_per_input(tmp_path: Path, capsys, model_file: Path) -> None:
    save_png(tmp_path / "a.png", mixture(9))
    save_png(tmp_path / "b.png", mixture(10, 37, 45))
    code, _, _ = separate(capsys, model_file, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out",
                          str(tmp_path / "out"))  # fmt: skip
    assert code == 0
    panel = read_png(tmp_path / "out" / "panel.png")
    # Tiles scaled by 96 // 45 = 2: two rows of 56 and 74 pixels, three columns 90 wide, 4-pixel gutters, 16 header.
    assert panel.shape == (16 + 56 + 74 + 3 * 4, 3 * 90 + 4 * 4)
    first_tile = panel[20 : 20 + 56, 4 : 4 + 56]
    assert np.array_equal(first_tile[::2, ::2], mixture(9))  # the mixture itself, upscaled by pixel repetition


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bss-separate"] == "bss_model.separate:main"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("pillow") for d in deps)  # imported directly, not only through matplotlib


def test_cli_as_a_module(tmp_path: Path, model_file: Path) -> None:
    src = save_png(tmp_path / "mix.png", mixture(11))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bss_model.separate", "--checkpoint", str(model_file), "--threads", "1"]
    proc = subprocess.run([*cmd, str(src), "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_png(tmp_path / "out" / "mix.digit.png").shape == (28, 28)
    # And a refusal through the real entry point: one line, exit 2, no traceback, nothing written.
    (tmp_path / "cut.png").write_bytes(src.read_bytes()[:60])
    proc = subprocess.run([*cmd, str(tmp_path / "cut.png"), "--out", "out2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and str(tmp_path / "cut.png") in lines[0]
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------------
# Bad input: one line naming the file and the fix, exit 2, nothing written


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height in its header, with a tiny (broken) payload: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _npy_header_only(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _png(pixels: np.ndarray, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=format)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


# name -> (file name, bytes or None for "absent", words the error line must hold)
BAD_INPUTS: dict[str, tuple[str, bytes | None, tuple[str, ...]]] = {
    "missing": ("gone.png", None, ("does not exist",)),
    "empty": ("empty.png", b"", ("empty", "PNG")),
    "text": ("notes.png", b"just some text, not an image\n" * 3, ("not an image", "PNG")),
    "truncated png": ("cut.png", _png(mixture(12))[:80], ("truncated",)),
    "truncated png body": (
        "cut2.png",
        _png(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))[:-200],
        ("truncated",),
    ),  # fmt: skip
    "gif": ("anim.gif", _png(mixture(13), format="GIF"), ("GIF", "convert it to PNG")),
    "16-bit png": ("deep.png", _png(np.full((28, 28), 1000, np.uint16)), ("mode I;16", "8-bit")),
    "too large png": ("huge.png", _png(np.zeros((2049, 2049), np.uint8)), ("4,198,401 pixels", "crop or downscale")),
    "decompression bomb": ("bomb.png", _png_header_only(100_000, 100_000), ("decompression bomb", "downscale")),
    "nan npy": ("nan.npy", _npy(np.array([[0.5, np.nan], [0, 1]])), ("NaN", "nan_to_num")),
    "inf npy": ("inf.npy", _npy(np.array([[0.5, np.inf], [0, 1]], np.float32)), ("NaN or infinite",)),
    "float above 1": ("hot.npy", _npy(np.full((28, 28), 1.5)), ("outside [0, 1]", "rescale")),
    "float below 0": ("cold.npy", _npy(np.full((28, 28), -0.1)), ("outside [0, 1]",)),
    "int above 255": ("wide.npy", _npy(np.full((28, 28), 300, np.int16)), ("outside 0-255", "uint8")),
    "3-D npy": ("stack.npy", _npy(np.zeros((3, 28, 28), np.uint8)), ("3-D array (3x28x28)", "2-D")),
    "1-D npy": ("flat.npy", _npy(np.zeros(784, np.uint8)), ("1-D array", "2-D")),
    "scalar npy": ("one.npy", _npy(np.float32(0.5)), ("0-D array",)),
    "object npy": ("obj.npy", _npy(np.array([[None, 1]], dtype=object)), ("object", "uint8")),
    "bool npy": ("mask.npy", _npy(np.zeros((28, 28), bool)), ("bool", "uint8")),
    "empty npy": ("none.npy", _npy(np.zeros((0, 28), np.uint8)), ("empty 0x28",)),
    "truncated npy": ("short.npy", _npy(np.zeros((28, 28), np.float32))[:-100], ("truncated or corrupt",)),
    "huge npy": ("vast.npy", _npy_header_only((3000, 3000)), ("9,000,000 pixels",)),
    "not npy": ("fake.npy", b"\x93NUMPX" + bytes(100), ("not a readable .npy",)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line(tmp_path: Path, capsys, model_file: Path, case: str) -> None:
    name, data, words = BAD_INPUTS[case]
    good = save_png(tmp_path / "good.png", mixture(14))
    bad = tmp_path / name
    if data is not None:
        bad.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.digit.png").write_bytes(b"a result the user keeps")
    before = listing(out)
    # The good input first: it must not be written either, since the batch fails as a whole.
    code, stdout, stderr = separate(capsys, model_file, str(good), str(bad), "--out", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert str(bad) in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert stdout == ""
    assert listing(out) == before  # nothing written, nothing lost, no temp files


@pytest.mark.parametrize("case", ["garbage", "plain torch file", "code pickle", "missing"])
def test_a_checkpoint_that_is_not_a_model_is_refused(tmp_path: Path, capsys, case: str) -> None:
    src = save_png(tmp_path / "mix.png", mixture(15))
    path = tmp_path / "model.pt"
    if case == "garbage":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif case == "plain torch file":
        torch.save({"model": {"w": torch.zeros(3)}}, path)
    elif case == "code pickle":
        torch.save({"format": ckpt.FORMAT, "config": {}, "model": os.system}, path)
    code, _, stderr = separate(capsys, path, str(src), "--out", str(tmp_path / "out"))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_same_stems_are_refused(tmp_path: Path, capsys, model_file: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = save_png(tmp_path / "a" / "x.png", mixture(16))
    second = save_png(tmp_path / "b" / "x.png", mixture(17))
    np.save(tmp_path / "a" / "x.npy", mixture(18))
    out = tmp_path / "out"
    save_png(tmp_path / "b" / "X.png", mixture(19))
    cases = ((first, second), (first, tmp_path / "a" / "x.npy"), (first, tmp_path / "b" / "X.png"), (first, first))
    for pair in cases:
        code, _, stderr = separate(capsys, model_file, *map(str, pair), "--out", str(out))
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert str(pair[1]) in lines[0] and ".digit.png" in lines[0] and "rename" in lines[0]
        assert not out.exists()
    assert "given twice" in lines[0]


def test_an_out_that_cannot_be_written_is_refused(tmp_path: Path, capsys, model_file: Path) -> None:
    src = save_png(tmp_path / "mix.png", mixture(19))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out, words in ((blocker / "sub", "cannot be created"), (blocker, "not a folder")):
        code, _, stderr = separate(capsys, model_file, str(src), "--out", str(out))
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0] and str(out) in lines[0], stderr
    assert blocker.read_text() == "not a folder"


def test_outputs_never_overwrite_an_input(tmp_path: Path, capsys, model_file: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    src = save_png(out / "panel.png", mixture(20))  # the user's own image, named like our panel
    before = listing(out)
    code, _, stderr = separate(capsys, model_file, str(src), "--out", str(out))
    assert code == 2 and "would overwrite the input" in stderr and str(src) in stderr
    assert listing(out) == before


# A write that fails for real, in a subprocess: RLIMIT_FSIZE makes every write past the limit fail with EFBIG
# (SIGXFSZ ignored), as a full disk fails writes, on any filesystem and without root. The 28x28 outputs
# (a few hundred bytes) fit under the limit, the panel of three rows does not.
FAILING_WRITE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from bss_model.separate import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_failing_disk_leaves_out_as_it_was(tmp_path: Path, model_file: Path) -> None:
    """Issue 21: a write that failed midway (a full disk during --out) left new images beside the old panel.png.
    Now every output is written before any is renamed into place: --out is left as it was, byte for byte."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    srcs = [str(save_png(tmp_path / f"m{i}.png", mixture(21 + i))) for i in range(3)]
    cmd = ["--checkpoint", str(model_file), "--threads", "1", "--out", str(out)]
    assert main([*cmd, *srcs[:2]]) == 0  # the previous run's outputs
    before = listing(out)
    for name in ("m0.digit.png", "m1.fashion.png"):
        assert len(before[name]) < 2048 < len(before["panel.png"]), "the limit must split small files from the panel"
    for i in range(2):  # other mixtures under the same names: every output of the new run differs from the old
        save_png(tmp_path / f"m{i}.png", mixture(41 + i))
    proc = subprocess.run([sys.executable, "-c", FAILING_WRITE, "2048", *cmd, *srcs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    changed = sorted(k for k, v in listing(out).items() if before.get(k) != v)
    assert not changed, f"--out half-overwritten: {changed} new, the rest old"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] and "nothing in it was changed" in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(before), "a temp file was left behind"

    # Into a folder that did not exist: none is left behind either.
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-c", FAILING_WRITE, "2048", *cmd[:-1], str(fresh), *srcs], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and not fresh.exists(), proc.stderr


def test_no_inputs_and_bad_demo_counts_exit_2(tmp_path: Path, capsys, model_file: Path) -> None:
    for args in ([], ["--demo", "0"], ["--demo", "many"], ["--demo", "100000"]):
        code, _, stderr = separate(capsys, model_file, *args, "--out", str(tmp_path / "out"))
        assert code == 2 and "Traceback" not in stderr and "error:" in stderr, (args, stderr)
    assert not (tmp_path / "out").exists()


def test_the_measured_throughput_is_one_line_and_in_the_json(tmp_path: Path, capsys, model_file: Path) -> None:
    for k in range(3):
        save_png(tmp_path / f"m{k}.png", mixture(10 + k))
    images = [str(tmp_path / f"m{k}.png") for k in range(3)]
    code, stdout, stderr = separate(capsys, model_file, *images, "--out", str(tmp_path / "o"))
    assert code == 0 and stderr == ""
    lines = [line for line in stdout.splitlines() if line.startswith("throughput: ")]
    assert len(lines) == 1 and stdout.strip().splitlines()[-1] == lines[0]
    rate = float(lines[0].split()[1].replace(",", ""))
    assert rate > 0 and " images/s on cpu, 1 thread (" in lines[0] and "3 image(s) separated in " in lines[0]
    code, stdout, _ = separate(capsys, model_file, *images, "--out", str(tmp_path / "j"), "--json")
    t = json.loads(stdout)["throughput"]
    assert code == 0 and t["images"] == 3 and t["device"] == "cpu" and t["threads"] == 1
    assert t["seconds"] > 0 and t["images_per_s"] == pytest.approx(3 / t["seconds"])
