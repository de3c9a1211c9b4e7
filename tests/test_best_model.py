"""best_model.pt describes itself: a forward pass rebuilt from the file alone matches the project's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bss_model import checkpoint as ckpt
from bss_model.config import config_from_dict
from bss_model.data import mix, pad32
from bss_model.model import build_model
from search.best_model import export_best_model
from search.results import SeedResult

MACHINE_PATH = "/home/trainer/private/bss-data"


# The family's other parts (model.block, model.attention, model.dilation, model.upsample), all at once.
PARTS = {"block": "residual", "attention": "gate", "dilation": [1, 2], "bottleneck_convs": 3, "upsample": "bilinear"}


@pytest.fixture(scope="module", params=["plain", "parts"])
def best_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best_model.pt exported from a (random-weight) retrain checkpoint with the consistent head and a ReLU
    output, trained (so the config says) from a data folder of the training machine; ``parts``: with residual
    units, attention gates, a dilated bottleneck and bilinear up-sampling too."""
    tmp = tmp_path_factory.mktemp("best")
    parts = PARTS if request.param == "parts" else {}
    cfg = config_from_dict(
        {"model": {"variant": "tiny", "filters": 4, "bottleneck_convs": 2, "head": "consistent", "output": "relu",
                   **parts},
         "data": {"dir": MACHINE_PATH}}
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for p in model.parameters():  # away from torch's init, so that every layer matters to the output
        p.data.add_(0.05 * torch.randn_like(p))
    folder = tmp / "checkpoint_000001"
    ckpt.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 2, "n_params": 1}, folder / ckpt.FILENAME)
    seed = SeedResult(1000, 0.01, 0.02, {"test_mse_mean": 0.02}, str(folder), "", str(tmp))
    export_best_model(seed, tmp / "best_model.pt")
    return tmp / "best_model.pt"


def strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in strings(k) + strings(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in strings(v)]
    return [obj] if isinstance(obj, str) else []


def forward_from_file(state: dict[str, Any], x: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
    """The U-Net as the file's conventions describe it, in torch.nn.functional: no bss_model code.
    ``skip_first``: the other guess at the concatenation order, against what the file states."""
    w, m, conv = state["model"], state["config"]["model"], state["conventions"]
    assert m["norm"] == "none", "this reimplementation covers the file's config only"
    assert conv["concat"].startswith("each decoder level: torch.cat([up(h), skip], dim=1)")
    assert "convs.body(h) + convs.shortcut(h)" in conv["block"] and "k % len(model.dilation)" in conv["dilation"]
    assert "sigmoid(psi(relu(theta(skip) + phi(up(h)))))" in conv["attention"]
    assert "mode='bilinear', align_corners=False), then the 3x3 conv up.conv" in conv["upsample"]

    def plain(prefix: str, h: torch.Tensor, n: int, rates: list[int]) -> torch.Tensor:
        for i in range(n):  # [conv, ReLU] per conv: the convs' state_dict indices are 0, 2, 4, ...
            d = rates[i % len(rates)]
            h = F.conv2d(h, w[f"{prefix}.{2 * i}.weight"], w[f"{prefix}.{2 * i}.bias"], padding=d, dilation=d)
            h = F.relu(h)
        return h

    def residual(prefix: str, h: torch.Tensor, n: int, rates: list[int], image: bool) -> torch.Tensor:
        b, k = h, 0  # the body: [ReLU,] conv per conv; the first conv of encoders.0 takes the image as it is
        for i in range(n):
            if i > 0 or not image:
                b, k = F.relu(b), k + 1
            d = rates[i % len(rates)]
            b = F.conv2d(b, w[f"{prefix}.body.{k}.weight"], w[f"{prefix}.body.{k}.bias"], padding=d, dilation=d)
            k += 1
        proj = f"{prefix}.shortcut.weight"
        return b + (F.conv2d(h, w[proj], w[f"{prefix}.shortcut.bias"]) if proj in w else h)

    def convs(prefix: str, h: torch.Tensor, n: int, rates: list[int] = (1,), image: bool = False) -> torch.Tensor:
        if n == 0:
            return h
        return residual(prefix, h, n, list(rates), image) if m["block"] == "residual" else plain(prefix, h, n, rates)

    def up(prefix: str, h: torch.Tensor) -> torch.Tensor:
        if m["upsample"] == "bilinear":
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            return F.conv2d(h, w[f"{prefix}.conv.weight"], w[f"{prefix}.conv.bias"], padding=1)
        return F.conv_transpose2d(h, w[f"{prefix}.weight"], w[f"{prefix}.bias"], stride=2)

    def gate(prefix: str, skip: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if m["attention"] != "gate":
            return skip
        q = F.relu(
            F.conv2d(skip, w[f"{prefix}.theta.weight"])
            + F.conv2d(g, w[f"{prefix}.phi.weight"], w[f"{prefix}.phi.bias"])
        )
        return skip * torch.sigmoid(F.conv2d(q, w[f"{prefix}.psi.weight"], w[f"{prefix}.psi.bias"]))

    h, skips = x, []
    for i in range(m["depth"]):
        skip = convs(f"encoders.{i}.convs", h, m["encoder_convs"], image=i == 0)
        skips.append(skip)
        h = F.max_pool2d(skip, 2)
    h = convs("bottleneck", h, m["bottleneck_convs"], m["dilation"])
    for i, skip in enumerate(reversed(skips)):
        u = up(f"decoders.{i}.up", h)
        skip = gate(f"decoders.{i}.gate", skip, u)
        h = convs(f"decoders.{i}.convs", torch.cat([skip, u] if skip_first else [u, skip], dim=1), m["decoder_convs"])
    y = F.conv2d(h, w["head.proj.weight"], w["head.proj.bias"])
    y = F.conv2d(y, w["head.depthwise.weight"], w["head.depthwise.bias"], padding=1, groups=2)
    if m["head"] == "consistent":
        y = y + (x - y.mean(dim=1, keepdim=True))
    return F.relu(y) if m["output"] == "relu" else y


def test_best_model_states_its_conventions_and_no_machine_path(best_model: Path) -> None:
    state = torch.load(best_model, weights_only=True)
    conv = state["conventions"]
    assert conv["output_channels"] == ["digit", "fashion"]
    assert conv["pad_offset"] == [2, 2] and conv["image_size"] == [28, 28] and conv["model_size"] == [32, 32]
    assert conv["input_range"] == [0.0, 1.0] and "(digit + fashion) / 2" in conv["input"]
    assert "torch.cat([up(h), skip], dim=1)" in conv["concat"]
    assert not [s for s in strings(state) if MACHINE_PATH in s], "the training machine's data folder is in the file"
    assert state["config"]["data"]["dir"] == ""


def test_a_prediction_rebuilt_from_the_file_alone_matches_the_projects_model(best_model: Path) -> None:
    state = torch.load(best_model, weights_only=True)
    conv = state["conventions"]
    rng = np.random.default_rng(0)
    digit, fashion = (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8) for _ in range(2))
    # The input as the file states it: (digit + fashion) / 2 on [0, 1], 28x28 zero-padded to 32x32 at (2, 2).
    (top, left), (h, w) = conv["pad_offset"], conv["image_size"]
    x = torch.zeros(3, 1, *conv["model_size"])
    x[:, 0, top : top + h, left : left + w] = torch.as_tensor(
        (digit / 255.0 + fashion / 255.0) / 2, dtype=torch.float32
    )
    with torch.no_grad():
        rebuilt = forward_from_file(state, x)
        # The project's way: load_model, and its own mixing of padded images.
        model, _ = ckpt.load_model(best_model)
        x_project, _ = mix(torch.as_tensor(pad32(digit)), torch.as_tensor(pad32(fashion)))
        project = model.eval()(x_project)
    torch.testing.assert_close(x, x_project)
    torch.testing.assert_close(rebuilt, project, rtol=1e-5, atol=1e-6)
    assert project.shape == (3, len(conv["output_channels"]), 32, 32)
    # The stated concatenation order matters: the other one is another model.
    with torch.no_grad():
        swapped = forward_from_file(state, x, skip_first=True)
    assert (swapped - project).abs().max() > 1e-2
