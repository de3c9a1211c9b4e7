"""The main job with an evaluation that fails late -- test-only, so neither bss_model nor search carries a fault hook.

    python tests/_eval_fault_run.py LIMIT <search/run.py arguments>

This is ``search/run.py`` with a test-only evaluation: the protocol's evaluation of the retrained seeds fails as
a GPU's would when ``eval.batch_size`` exceeds LIMIT (an evaluation-only setting the config accepts but the
machine cannot run), after the search has finished and every seed has trained its budget.
"""

from __future__ import annotations

import sys
from typing import Any

import search.best_model
from search.run import main

LIMIT = int(sys.argv[1])


# Defined in __main__, it reaches the Ray worker of the evaluation task by value, with LIMIT.
def evaluate_seeds(seeds: Any, eval_overrides: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> Any:
    """search.best_model.evaluate_seeds, refusing batches above LIMIT."""
    from search.best_model import evaluate_seeds as real_evaluate_seeds

    if (eval_overrides or {}).get("batch_size", 0) > LIMIT:
        raise RuntimeError(
            f"injected: eval.batch_size={eval_overrides['batch_size']} does not fit (tests/_eval_fault_run.py)"
        )
    return real_evaluate_seeds(seeds, eval_overrides, *args, **kwargs)


if __name__ == "__main__":
    search.best_model.evaluate_seeds = evaluate_seeds  # what the evaluation task runs, in this driver only
    raise SystemExit(main(sys.argv[2:]))
