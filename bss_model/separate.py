"""Apply a trained model to the user's own images: ``bss-separate``.

    python -m bss_model.separate --checkpoint results/<name>/best_model.pt IMAGE... [--out DIR] [--json]
    python -m bss_model.separate --checkpoint results/<name>/best_model.pt --demo 8 [--out DIR]

Each IMAGE (PNG, JPEG or BMP through Pillow, or a 2-D ``.npy``) is one mixture ``x = (digit + fashion) / 2``
with light shapes on black, as in training. For each, ``<stem>.digit.png`` and ``<stem>.fashion.png`` are
written at the input's size, plus one ``panel.png`` with a row per input (mixture | digit | fashion).

The console ends with the measured throughput, one line: images per second on the device it ran on (its
forward passes alone); ``--json`` carries the same figures as ``throughput``.

Everything is read and checked, and every output computed, before the first file is written; then every
file is written to a temp file beside it, and only once all are written are they renamed into place. So a bad
input, a bad checkpoint or a full disk stops the command with one line and leaves ``--out`` exactly as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bss_model.errors import BssError, one_line
from bss_model.inputs import InputError, Item, read_input
from bss_model.viz import titled_grid, to_uint8

# Forward passes are batched by pixel count (not image count), so a batch of large images stays as small
# in memory as one of many 32x32 ones: 2**22 px = 4096 images of 32x32.
PIXELS_PER_BATCH = 1 << 22
# The panel: at most this many rows (a taller PNG is unreadable), tiles upscaled to about this many pixels.
MAX_PANEL_ROWS = 100
PANEL_TILE = 96
DEMO_MAX = 1000
PANEL_NAME = "panel.png"


# --------------------------------------------------------------------------------------
# Separation: pure geometry and maths, then the batched forward pass


def pad_geometry(h: int, w: int, depth: int) -> tuple[tuple[int, int, int, int], bool]:
    """Zero padding ``(top, bottom, left, right)`` that makes [h, w] fit a U-Net of ``depth`` poolings,
    and whether the size differs from the 32x32 the model was trained on.

    28x28 gets the training padding exactly (2 each side, ``bss_model.data.pad32``); 32x32 none; any
    other size is padded to the next multiple of 2**depth (each pooling halves it), split evenly with
    the odd pixel at the bottom/right.
    """
    if (h, w) == (28, 28):
        return (2, 2, 2, 2), False
    if (h, w) == (32, 32):
        return (0, 0, 0, 0), False
    m = 2**depth
    ph, pw = -h % m, -w % m
    return (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2), True


def figures(
    x: np.ndarray, digit: np.ndarray, fashion: np.ndarray, truth: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, float]:
    """Per-image numbers for ``--json``, in float64.

    ``consistency_mse`` is how well the two outputs average back to the input: the mean of
    ``((digit + fashion) / 2 - x) ** 2``. With the truth (``--demo``), the MSE of each component, their mean
    (the protocol's ``mse``) and the mix baseline's (predict ``x`` for both) on the same image.
    """
    x, digit, fashion = (a.astype(np.float64) for a in (x, digit, fashion))
    out = {
        "consistency_mse": float(np.mean(((digit + fashion) / 2 - x) ** 2)),
        "mean_input": float(x.mean()),
        "mean_digit": float(digit.mean()),
        "mean_fashion": float(fashion.mean()),
    }
    if truth is not None:
        true_digit, true_fashion = (a.astype(np.float64) for a in truth)
        mse_digit = float(np.mean((digit - true_digit) ** 2))
        mse_fashion = float(np.mean((fashion - true_fashion) ** 2))
        base = (float(np.mean((x - true_digit) ** 2)) + float(np.mean((x - true_fashion) ** 2))) / 2
        out.update(
            {"mse": (mse_digit + mse_fashion) / 2, "mse_digit": mse_digit, "mse_fashion": mse_fashion,
             "baseline_mix_mse": base}
        )  # fmt: skip
    return out


def separate_images(model: Any, runtime: Any, images: list[np.ndarray], depth: int) -> list[np.ndarray]:
    """``[2, H, W]`` float32 (digit, fashion), clamped to [0, 1], for each float32 [H, W] image.

    Images of one size are padded alike and run together, in batches of at most PIXELS_PER_BATCH pixels.
    """
    import torch

    from bss_model.evaluate import model_predictor

    predict = model_predictor(model, runtime)
    results: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    for (h, w), indices in by_size.items():
        (top, bottom, left, right), _ = pad_geometry(h, w, depth)
        per_batch = max(1, PIXELS_PER_BATCH // ((h + top + bottom) * (w + left + right)))
        for start in range(0, len(indices), per_batch):
            chunk = indices[start : start + per_batch]
            batch = np.stack([images[i] for i in chunk])[:, None]
            batch = np.pad(batch, ((0, 0), (0, 0), (top, bottom), (left, right)))
            with torch.inference_mode():
                pred = predict(torch.from_numpy(batch).to(runtime.device)).float().clamp_(0, 1)
            pred = pred[:, :, top : top + h, left : left + w].cpu().numpy()
            for j, i in enumerate(chunk):
                results[i] = np.ascontiguousarray(pred[j])
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Pictures


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 [H, W] array as 8-bit grayscale PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def panel_pixels(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gap: int = 4, header: int = 16) -> np.ndarray:
    """One uint8 image: a row per input of ``mixture | digit | fashion`` with column titles on top.

    Tiles are upscaled by a whole factor (nearest neighbour, so pixels stay crisp) to about PANEL_TILE pixels;
    rows of different sizes are left-aligned in columns as wide as the widest tile (bss_model.viz draws it).
    """
    largest = max(max(r[0].shape) for r in rows)
    scale = max(1, min(8, PANEL_TILE // largest))
    return titled_grid(rows, ("mixture", "digit", "fashion"), gap=gap, header=header, scale=scale)


# --------------------------------------------------------------------------------------
# The command


def _demo_items(cfg: Any, n: int, seed: int, data_dir: str | None) -> list[Item]:
    """``n`` test mixtures with their true components, as 28x28 images like the datasets' own files.

    This is a user-facing demo of a finished model, not part of any search or choice, so it reads the
    test sets (like ``bss_model.evaluate``): a model is shown pairs it never saw in training or validation.
    """
    from bss_model.data import draw_from, load_test

    if data_dir:
        cfg.data.dir = str(Path(data_dir).resolve())
    elif cfg.data.dir and not Path(cfg.data.dir).is_dir():
        cfg.data.dir = ""  # the training machine's folder: fall back to BSS_DATA_DIR / the cache
    test_digit, test_fashion = load_test(cfg.data)
    # One pair at a time (the one draw, bss_model.data.draw_from) from one seeded generator, so demo-k is the
    # same pair whatever N is: --demo 8 extends --demo 4 rather than reshuffling it.
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        (i,), (j,) = draw_from(rng, len(test_digit), len(test_fashion), 1)
        # load_test pads to 32x32; the 28x28 original is the centre (pad32 adds 2 pixels each side).
        digit = test_digit[i, 2:30, 2:30].astype(np.float32) / 255
        fashion = test_fashion[j, 2:30, 2:30].astype(np.float32) / 255
        x = (digit + fashion) / 2  # the reference mixing (bss_model.data.mix), exact in float32
        items.append(Item(name=f"demo-{k:03d}", stem=f"demo-{k:03d}", image=x, truth=(digit, fashion)))
    return items


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be written, before anything is computed or created."""
    if out.exists() and not out.is_dir():
        raise BssError(f"--out {out} exists and is not a folder: pass a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BssError(f"--out {out} cannot be created ({probe} is a file): pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BssError(f"--out {out} is not writable ({probe}: permission denied): pass a folder you can write")


def _plan_outputs(items: list[Item], out: Path) -> dict[str, dict[str, Path]]:
    """Output paths per item; refuses two inputs that would write the same file, or an output over an input."""
    seen: dict[str, str] = {}
    for item in items:
        key = item.stem.casefold()  # X.png and x.png are one file on case-insensitive filesystems (macOS, Windows)
        if key in seen:
            other = seen[key]
            what = "is given twice" if other == item.name else f"and {other} share the stem '{item.stem}'"
            raise InputError(
                f"{item.name} {what}, so both would write {item.stem}.digit.png: rename one, or run them with "
                "different --out folders"
            )
        seen[key] = item.name
    plans = {}
    for item in items:
        plan = {"digit": out / f"{item.stem}.digit.png", "fashion": out / f"{item.stem}.fashion.png"}
        if item.truth is not None:
            plan["mixture"] = out / f"{item.stem}.png"
            plan["true_digit"] = out / f"{item.stem}.true-digit.png"
            plan["true_fashion"] = out / f"{item.stem}.true-fashion.png"
        plans[item.name] = plan
    inputs = {Path(item.name).resolve(): item.name for item in items if item.truth is None}
    for path in [p for plan in plans.values() for p in plan.values()] + [out / PANEL_NAME]:
        if path.resolve() in inputs:
            raise InputError(
                f"writing {path} would overwrite the input {inputs[path.resolve()]}: pass another --out folder"
            )
    return plans


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after argument parsing; returns the ``--json`` document."""

    from bss_model.checkpoint import load_model
    from bss_model.evaluate import inference_runtime
    from bss_model.io import atomic_write_all
    from bss_model.runtime import resolve_device

    notices: list[str] = []
    items = [read_input(p) for p in args.images]  # every input checked before the model is even loaded
    model, cfg = load_model(args.checkpoint, device="cpu")
    if args.demo:
        items += _demo_items(cfg, args.demo, args.seed, args.data_dir)
    out = Path(args.out)
    _check_out(out)
    plans = _plan_outputs(items, out)

    depth = cfg.model.depth
    for item in items:
        h, w = item.image.shape
        (top, bottom, left, right), unusual = pad_geometry(h, w, depth)
        if unusual:
            item.notices.append(
                f"{item.name} is {w}x{h}, not the 32x32 the model was trained on: zero-padded to "
                f"{w + left + right}x{h + top + bottom} and cropped back; expect weaker separations"
            )
        notices += item.notices

    # The checkpoint's own runtime (precision, memory format), but on this machine's device and threads,
    # and never compiled: a one-off inference is over before torch.compile's warm-up would pay off.
    resolve_device(args.device, "--device")  # errors in the flag's words, not train.device's
    runtime = inference_runtime(cfg, args.device, args.threads)
    model = runtime.prepare_model(model).eval()
    # The forward passes alone (reading, padding, encoding and writing aside): what this device delivered. The
    # predictions end on the CPU (.cpu()), so a GPU's work is finished when the clock stops.
    start = time.perf_counter()
    preds = separate_images(model, runtime, [item.image for item in items], depth)
    seconds = time.perf_counter() - start
    bad = next((item.name for item, pred in zip(items, preds, strict=True) if not np.isfinite(pred).all()), None)
    if bad is not None:  # finite weights can still overflow: a NaN picture (and JSON) is no result
        raise BssError(
            f"{args.checkpoint} predicts non-finite values for {bad}: its weights overflow; pass another checkpoint"
        )

    # Encode every file in memory first: nothing is written unless all of it can be.
    files: list[tuple[Path, bytes]] = []
    report = []
    for item, pred in zip(items, preds, strict=True):
        plan = plans[item.name]
        digit, fashion = pred
        files += [(plan["digit"], png_bytes(to_uint8(digit))), (plan["fashion"], png_bytes(to_uint8(fashion)))]
        if item.truth is not None:
            files += [(plan["mixture"], png_bytes(to_uint8(item.image)))]
            true_digit, true_fashion = item.truth
            files += [(plan["true_digit"], png_bytes(to_uint8(true_digit)))]
            files += [(plan["true_fashion"], png_bytes(to_uint8(true_fashion)))]
        h, w = item.image.shape
        report.append(
            {"input": item.name, "height": h, "width": w, **{k: str(p) for k, p in plan.items()},
             **figures(item.image, digit, fashion, item.truth)}
        )  # fmt: skip
    rows = [(item.image, pred[0], pred[1]) for item, pred in zip(items, preds, strict=True)]
    if len(rows) > MAX_PANEL_ROWS:
        notices.append(f"{len(rows)} inputs: the panel shows the first {MAX_PANEL_ROWS}")
    files.append((out / PANEL_NAME, png_bytes(panel_pixels(rows[:MAX_PANEL_ROWS]))))

    for line in notices:
        print(f"notice: {one_line(line)}", file=sys.stderr)
    fresh = not out.exists()
    try:
        # All or nothing: a full disk fails while the temp files are written, before any output is replaced,
        # so --out is never left half old, half new (new images beside an old panel.png).
        atomic_write_all(files)
    except OSError as exc:
        why = one_line(exc)
        if fresh:  # the folder this run made, now empty again
            with contextlib.suppress(OSError):
                out.rmdir()
        raise BssError(
            f"writing into --out {out} failed ({why}): nothing in it was changed; free some space or pass another --out"
        ) from None

    doc: dict[str, Any] = {"checkpoint": str(args.checkpoint), "out": str(out), "panel": str(out / PANEL_NAME)}
    doc["images"] = report
    import torch

    doc["throughput"] = {
        "images": len(items),
        "seconds": seconds,
        "images_per_s": len(items) / seconds if seconds > 0 else None,
        "device": str(runtime.device),
        "precision": "bf16" if runtime.bf16 else "fp32",
        "threads": torch.get_num_threads() if runtime.device.type == "cpu" else None,
    }
    demo = [r for r in report if "mse" in r]
    if demo:
        doc["demo"] = {
            "n": len(demo),
            "seed": args.seed,
            "mse": float(np.mean([r["mse"] for r in demo])),
            "baseline_mix_mse": float(np.mean([r["baseline_mix_mse"] for r in demo])),
        }
    return doc


def throughput_line(t: dict[str, Any]) -> str:
    """The measured throughput as one line: images per second on the device, the forward passes alone."""
    on = t["device"] + (f", {t['threads']} thread{'s' if t['threads'] != 1 else ''}" if t["threads"] else "")
    rate = f"{t['images_per_s']:,.0f}" if t["images_per_s"] else "n/a"
    return (f"throughput: {rate} images/s on {on} ({t['precision']}): {t['images']} image(s) separated in "
            f"{t['seconds'] * 1e3:.1f} ms, forward passes only")  # fmt: skip


def _print_summary(doc: dict[str, Any]) -> None:
    for r in doc["images"]:
        line = f"{r['input']} ({r['width']}x{r['height']}): {r['digit']} {r['fashion']}"
        if "mse" in r:
            line += f"  MSE vs truth {r['mse']:.4f} (mix baseline {r['baseline_mix_mse']:.4f})"
        print(line)
    print(f"panel (mixture | digit | fashion, one row per input in this order): {doc['panel']}")
    print(throughput_line(doc["throughput"]))
    if "demo" in doc:
        d = doc["demo"]
        print(
            f"demo: mean MSE vs truth {d['mse']:.4f} over {d['n']} test mixtures (seed {d['seed']}); "
            f"the mix baseline scores {d['baseline_mix_mse']:.4f}"
        )


def _positive_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= DEMO_MAX:
        raise argparse.ArgumentTypeError(f"expected 1..{DEMO_MAX}, got {n}")
    return n


def _seed(text: str) -> int:
    from bss_model.config import MAX_SEED

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    from bss_model.cli import add_common_flags
    from bss_model.errors import cli_entry

    @cli_entry
    def _main() -> int:
        p = argparse.ArgumentParser(
            prog="bss-separate",
            description="Separate mixtures (light shapes on black, like (digit + fashion) / 2) into a digit and a "
            "fashion item with a trained model.",
        )
        p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG/JPEG/BMP or 2-D .npy (uint8, or floats 0-1)")
        p.add_argument("--checkpoint", required=True, help="best_model.pt, a checkpoint.pt, or a run folder")
        p.add_argument("--out", default="separated", help="folder for the outputs (default: separated)")
        p.add_argument("--json", action="store_true", help="print per-image figures as JSON on stdout")
        p.add_argument("--demo", type=_positive_count, default=0, metavar="N",
                       help="also separate N seeded test-set mixtures, written with their true components")  # fmt: skip
        p.add_argument("--seed", type=_seed, default=0, help="seed of the --demo draw (default 0)")
        p.add_argument("--data-dir", default=None, help="for --demo: folder with mnist/ and fashion-mnist/")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
        add_common_flags(p, "bss-separate")
        args = p.parse_args(argv)
        if not args.images and not args.demo:
            p.error("give at least one IMAGE, or --demo N to try the model on test mixtures")
        ok_device = args.device in ("auto", "cpu", "cuda") or (
            args.device.startswith("cuda:") and args.device[5:].isdigit()
        )
        if not ok_device or args.threads < 0:
            p.error("--device must be auto, cpu, cuda or cuda:N, and --threads >= 0")
        from bss_model.runtime import check_threads

        check_threads(args.threads, f"--threads {args.threads}")  # before any file is read
        doc = run(args)
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            print()
        else:
            _print_summary(doc)
        return 0

    return _main()


if __name__ == "__main__":
    raise SystemExit(main())
