"""The trainable's GPU sharing (issue 7): a fractional GPU caps the trial's CUDA memory at its share, and a
trial that runs out of memory fails with the one line the report shows. No GPU needed: ``train`` and the
cap are replaced, and the error goes through Ray's own error wrapping to the report's trial row."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from ray import tune
from ray.exceptions import RayTaskError

import search.trainable as trainable
from bss_model.config import load_config
from search.selection import summarize_trials

BASE = load_config(None, ["model.variant=tiny", "train.device=cpu"]).to_dict()
CARD = 80 * 2**30  # an 80 GiB card
SHARE_LINE = (
    "trial ran out of its GPU share (0.25 of the card, 20.0 GiB): raise tune.gpus_per_trial (fewer trials per GPU) "
    "or lower base.train.batch_size"
)


@pytest.fixture
def caps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[float, torch.device]]:
    """Record cap_gpu_memory calls; keep Ray's session and runtime context out of a plain test process."""
    calls: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_dir=lambda: str(tmp_path)))
    monkeypatch.setattr(trainable, "cap_gpu_memory", lambda fraction, device: calls.append((fraction, device)))
    monkeypatch.setattr(trainable, "_node_info", lambda: {"pid": 1, "hostname": "box", "node_id": "n0"})
    monkeypatch.setattr(trainable, "_card_bytes", lambda device: CARD)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    return calls


def failing_train(exc: BaseException) -> Any:
    def train(cfg: Any, **kwargs: Any) -> Any:
        raise exc

    return train


def run_trial(share: float) -> None:
    trainable.train_trial({"train.lr": 1e-3}, BASE, gpu_share=share)


@pytest.mark.parametrize(("share", "capped"), [(0.25, True), (0.5, True), (0.0, False), (1.0, False), (2.0, False)])
def test_a_fractional_gpu_caps_memory_at_its_share_before_training(
    caps: list, monkeypatch: pytest.MonkeyPatch, share: float, capped: bool
) -> None:
    seen_before_train: list[list] = []

    def train(cfg: Any, **kwargs: Any) -> Any:
        seen_before_train.append(list(caps))
        raise KeyboardInterrupt  # stop here: only the order matters

    monkeypatch.setattr(trainable, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run_trial(share)
    expected = [(share, torch.device("cpu"))] if capped else []
    assert caps == expected and seen_before_train == [expected]  # requested once, before training started


def test_out_of_memory_is_one_line_naming_gpus_per_trial(caps: list, monkeypatch: pytest.MonkeyPatch) -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity ...")
    monkeypatch.setattr(trainable, "train", failing_train(oom))
    with pytest.raises(trainable.TrialOutOfMemory) as err:
        run_trial(0.25)
    assert str(err.value) == SHARE_LINE and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the allocator's traceback is not the story


def test_out_of_memory_wrapped_by_compile_or_graph_capture_is_translated_too(
    caps: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        monkeypatch.setattr(trainable, "train", failing_train(wrapped))
    with pytest.raises(trainable.TrialOutOfMemory, match="raise tune.gpus_per_trial"):
        run_trial(0.25)
    monkeypatch.setattr(trainable, "train", failing_train(RuntimeError("CUDA error: out of memory")))
    with pytest.raises(trainable.TrialOutOfMemory, match="raise tune.gpus_per_trial"):
        run_trial(0.5)
    monkeypatch.setattr(trainable, "train", failing_train(ValueError("not a memory problem")))
    with pytest.raises(ValueError, match="not a memory problem"):  # anything else passes through untouched
        run_trial(0.25)


def test_the_whole_card_message_does_not_suggest_a_bigger_share() -> None:
    line = trainable.out_of_memory_message(1.0, CARD)
    assert line.startswith("trial ran out of GPU memory with a whole card (80.0 GiB): lower base.train.batch_size")
    assert trainable.out_of_memory_message(0.25, None).startswith("trial ran out of its GPU share (0.25 of the card):")


def test_the_report_shows_exactly_that_line(caps: list, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray wraps what the trainable raised, traceback first; the trial row must carry the one line alone.
    monkeypatch.setattr(trainable, "train", failing_train(torch.OutOfMemoryError("CUDA out of memory.")))
    try:
        run_trial(0.25)
    except trainable.TrialOutOfMemory as exc:
        error = RayTaskError("train", traceback.format_exc(), exc, proctitle="ray::ImplicitFunc.train()", pid=1,
                             ip="127.0.0.1").as_instanceof_cause()  # fmt: skip
    assert str(error).splitlines()[-1] == f"search.trainable.TrialOutOfMemory: {SHARE_LINE}"
    result = tune.Result(metrics={"trial_id": "t0", "epoch": 1, "val_mse": 0.01}, checkpoint=None, error=error,
                         path="/r/search/train_trial_ab12c_0_lr=0.001")  # fmt: skip
    (row,) = summarize_trials([result], budget=3)
    assert row.status == "errored" and row.error == SHARE_LINE


def test_trial_workers_drop_only_the_unraisable_exit_of_rays_sigterm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import gc

    from search.trainable import quiet_termination

    class Finalizer:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:  # an exception here is "unraisable": Python hands it to the hook
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", quiet_termination)
    Finalizer(SystemExit(1))  # what Ray's SIGTERM handler raises when it lands in a finalizer
    gc.collect()
    assert capsys.readouterr().err == ""
    Finalizer(ValueError("a real problem in a finalizer"))
    gc.collect()
    assert "ValueError: a real problem in a finalizer" in capsys.readouterr().err
