"""The main job with one injected worker fault -- test-only, so neither bss_model nor search carries a fault hook.

    python tests/_faulty_run.py EPOCH MARKER <search/run.py arguments>

This is ``search/run.py`` with a test-only trainable: the first trial (of the search or the
retrain) to finish epoch EPOCH-1 raises ``injected fault at epoch EPOCH`` right after that
epoch is reported and checkpointed, i.e. before epoch EPOCH starts. It creates MARKER first, so
the fault fires once, in one process, and Tune's retry from the epoch EPOCH-1 checkpoint runs on.

The next trial to finish epoch EPOCH-1 after that (a healthy one: the retry starts past it) offers
itself to be SIGKILLed: it writes "<pid> <trial folder>" to MARKER.victim and waits there, its epoch
reported and checkpointed, for the test's kill (at most VICTIM_WAIT_S, then it trains on). A test
that polled for "a trial between its checkpoint and its next epoch" instead missed that window
when epochs took a fraction of a second.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import search.tuners
from search.run import main

AT, MARKER = int(sys.argv[1]), Path(sys.argv[2])
VICTIM, VICTIM_WAIT_S = MARKER.with_name(MARKER.name + ".victim"), 120.0


def offer_to_be_killed() -> None:
    """The first trial past the fault to finish epoch AT-1 names itself in VICTIM and waits to be killed."""
    try:
        fd = os.open(VICTIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one victim
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {Path.cwd().name}\n")
    deadline = time.monotonic() + VICTIM_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)


# The same name as search.trainable.train_trial, as Tune reports it. Defined in __main__, it
# reaches the Ray workers by value, with AT and MARKER.
def train_trial(params: dict[str, Any], base: dict[str, Any], **kwargs: Any) -> None:
    """search.trainable.train_trial, its bss_model ``train`` wrapped so one epoch ends in a fault."""
    import search.trainable as trainable

    real_train = trainable.train

    def train(cfg: Any, on_epoch: Any = None, **kwargs: Any) -> Any:
        def on_epoch_then_fault(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
            on_epoch(metrics, checkpoint_dir)
            if metrics["epoch"] == AT - 1:
                try:
                    MARKER.touch(exist_ok=False)  # atomic: of two trials at this point at once, one faults
                except FileExistsError:
                    offer_to_be_killed()
                    return
                raise RuntimeError(f"injected fault at epoch {AT} (tests/_faulty_run.py)")

        return real_train(cfg, on_epoch=on_epoch_then_fault, **kwargs)

    trainable.train = train  # in this worker process only, for this trial
    try:
        trainable.train_trial(params, base, **kwargs)
    finally:
        trainable.train = real_train


if __name__ == "__main__":
    search.tuners.train_trial = train_trial  # what search.tuners hands to Tune, in this driver only
    raise SystemExit(main(sys.argv[3:]))
