"""The main job with an evaluation that fails late -- test-only, so neither bss_model nor search carries a fault hook.

    python tests/_eval_fault_run.py LIMIT <search/run.py arguments>

This is ``search/run.py`` with a test-only trainable: a retrain seed's final evaluation fails as a
GPU's would when ``eval.batch_size`` exceeds LIMIT (an evaluation-only setting the config accepts
but the machine cannot run), after the search has finished and the seed has trained its budget.
"""

from __future__ import annotations

import sys
from typing import Any

import search.tuners
from search.run import main

LIMIT = int(sys.argv[1])


# The same name as search.trainable.train_trial: Tune names trial folders after the trainable.
def train_trial(params: dict[str, Any], base: dict[str, Any], evaluate_test: bool = False, **kwargs: Any) -> None:
    """search.trainable.train_trial, its protocol evaluation refusing batches above LIMIT."""
    import search.trainable as trainable
    from bss_model import checkpoint as ckpt

    real_evaluate = trainable.evaluate_checkpoint

    def evaluate_checkpoint(checkpoint: Any, *args: Any, **kw: Any) -> Any:
        cfg = ckpt.config_of(ckpt.load(checkpoint), checkpoint)
        if cfg.eval.batch_size > LIMIT:
            raise RuntimeError(
                f"injected: eval.batch_size={cfg.eval.batch_size} does not fit (tests/_eval_fault_run.py)"
            )
        return real_evaluate(checkpoint, *args, **kw)

    trainable.evaluate_checkpoint = evaluate_checkpoint  # in this worker process only, for this trial
    try:
        trainable.train_trial(params, base, evaluate_test, **kwargs)
    finally:
        trainable.evaluate_checkpoint = real_evaluate


if __name__ == "__main__":
    search.tuners.train_trial = train_trial  # what search.tuners hands to Tune, in this driver only
    raise SystemExit(main(sys.argv[2:]))
