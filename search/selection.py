"""Choosing the winner: Tune's results as typed rows, and the rules that pick the best trial and seed.

The rule: the best configuration is the trial with the lowest validation MSE among those that
ran their full budget -- a trial stopped early by ASHA, diverged or errored can never win, and
neither can one without a finite validation MSE. Ties go to the earlier trial. The best retrain
seed is chosen the same way (lowest validation MSE), so the test sets choose nothing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from bss_model.config import Config
from bss_model.errors import BssError
from search.config import with_overrides
from search.results import (
    COMPLETED,
    CUT,
    DIVERGED,
    ERRORED,
    STOPPED,
    RetrainSummary,
    SearchSummary,
    SeedResult,
    TrialRow,
)
from search.storage import uri_of

METRIC, MODE = "val_mse", "min"  # what every trial reports and the search minimises


def trial_number(path: str) -> int:
    """The number in a trial folder's name: ``<number>-<id>`` (search.console.trial_label), or Tune's default
    ``<trainable>_<id>_<number>_<params>_<date>`` (experiments from before); -1 if neither."""
    name = Path(path).name
    match = re.match(r"^(\d+)-[0-9a-f]{5,}$", name) or re.match(r"^.+?_[0-9a-f]{5,}_(\d+)(_|$)", name)
    return int(match.group(1)) if match else -1


# The trainable's own errors (search/trainable.py: TrialOutOfMemory, TrialDiverged) are one line written for
# the user; Ray renders them after the traceback as "search.trainable.<Class>: <line>". The report shows the line.
# A user error raised in a trial (bss_model.errors: ConfigError, DataError, ...) is one such line too.
_OWN_ERROR = re.compile(r"^(search\.trainable\.Trial\w+|bss_model\.errors\.\w+Error): ")


def _last_line(error: Any) -> str:
    """An error's last line (Tune's carry the traceback first), or its type if it has no text."""
    if error is None:
        return ""
    return _OWN_ERROR.sub("", (str(error).strip().splitlines() or [type(error).__name__])[-1])


def _samples(metrics: dict[str, Any]) -> int | None:
    """The cumulative training samples a trial reported (bss_model's ``samples``); None if it never reported."""
    value = metrics.get("samples")
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_status(metrics: dict[str, Any], error: Any, budget: int) -> str:
    """diverged (the trainable said so) > errored > completed (full budget, finite val MSE) > cut (a budgeted
    search's deadline ended it: the trainable said so) > stopped (by ASHA).

    A cut trial trained less than the full budget for want of time, not because ASHA judged it: it is kept
    apart from the ASHA-stopped ones in the report, and like them it is never compared with full-budget
    trials (only "completed" trials can win)."""
    val = metrics.get(METRIC)
    if metrics.get("diverged"):
        return DIVERGED
    if error is not None:
        return ERRORED
    if int(metrics.get("epoch", 0) or 0) >= budget and isinstance(val, (int, float)) and math.isfinite(val):
        return COMPLETED
    if metrics.get("cut"):
        return CUT
    return STOPPED


def trial_row(
    metrics: dict[str, Any] | None, error: Any, config: dict[str, Any] | None, path: str, budget: int
) -> TrialRow:
    """One trial as a typed row, from its last result, its error (None if none) and its config; ``budget`` in epochs.

    The search summary and the Optuna study (``search/study.py``) both build their rows here, so a
    trial has one status everywhere.
    """
    m = metrics or {}
    val = m.get(METRIC)
    return TrialRow(
        trial_id=str(m.get("trial_id", "")) or Path(path).name,
        number=trial_number(path),
        params=dict(config or {}),
        epochs=int(m.get("epoch", 0) or 0),
        val_mse=float(val) if isinstance(val, (int, float)) else math.nan,
        status=trial_status(m, error, budget),
        error=m.get("reason") or _last_line(error),
        node=str(m.get("hostname", "")) + (f":{m['node_id'][:8]}" if m.get("node_id") else ""),
        path=str(path),
        samples=_samples(m),
        samples_per_s=_positive(m.get("samples_per_s")),
        epoch_tail_s=_tail(m),
    )


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def _tail(metrics: dict[str, Any]) -> float | None:
    """An epoch's time after its training (validation, checkpoint), from its last report."""
    total, train = metrics.get("epoch_time_s"), metrics.get("train_time_s")
    if _positive(total) is None or _positive(train) is None:
        return None
    return max(0.0, float(total) - float(train))


def summarize_trials(results: Any, budget: int) -> list[TrialRow]:
    """One row per Tune result (``.metrics``, ``.error``, ``.config``, ``.path``); ``budget`` in epochs."""
    return [
        trial_row(r.metrics, r.error, r.config, uri_of(r.path, getattr(r, "filesystem", None)), budget) for r in results
    ]


def pick_best(rows: list[TrialRow]) -> TrialRow:
    """The winner: lowest validation MSE among trials that ran their full budget (ties: the earlier trial)."""
    full = [r for r in rows if r.status == COMPLETED]
    if not full:
        raise BssError(f"no trial ran its full budget without error, so there is no best config: {why_none(rows)}")
    return min(full, key=lambda r: (r.val_mse, r.number))


def why_none(rows: list[TrialRow]) -> str:
    """The cause, and the fix, when no trial completed: one error shared by every trial is named as the cause
    (a setting every trial runs into, which more trials or another space would only repeat)."""
    if not rows:
        return "no trial ran: see search.log in the experiment folder"
    errors = Counter(r.error for r in rows if r.error)
    error, times = errors.most_common(1)[0] if errors else ("", 0)
    if times == len(rows):
        every = "the one trial" if len(rows) == 1 else f"all {len(rows)} trials"
        return f"{every} failed with the same error ({error}): fix that and run again"
    statuses = Counter(r.status for r in rows)
    counts = ", ".join(f"{k} {status}" for status, k in sorted(statuses.items()))
    often = f"; the most common error, in {times}: {error}" if error else ""
    return (
        f"of {len(rows)} trials, {counts}{often}. See the trial errors in the search/ folder, then raise "
        "tune.num_samples or loosen the space"
    )


def search_summary(base: Config, rows: list[TrialRow], wall_s: float) -> SearchSummary:
    """The winner with its full config, and the trials sorted: full budget first, then by val MSE (NaN last)."""
    best = pick_best(rows)

    def order(r: TrialRow) -> tuple[bool, float]:
        return r.status != COMPLETED, r.val_mse if math.isfinite(r.val_mse) else math.inf

    return SearchSummary(
        best_trial=best.trial_id,
        best_params=best.params,
        best_val_mse=best.val_mse,
        best_config=with_overrides(base.to_dict(), best.params).to_dict(),
        search_wall_s=wall_s,
        trials=sorted(rows, key=order),
    )


def summarize_retrain(results: Any) -> list[SeedResult]:
    """One result per retrain seed, in seed order. Their test figures come later, from the evaluation
    (search/best_model.py: every finished seed and the ensemble in one pass over the protocol)."""
    rows = []
    for r in results:
        m = r.metrics or {}
        epochs, budget = m.get("epoch"), m.get("budget_epochs")
        finished = r.error is None and isinstance(epochs, (int, float)) and epochs >= (budget or epochs)
        rows.append(
            SeedResult(
                seed=(r.config or {}).get("train.seed"),
                val_mse=m.get(METRIC),
                test_mse_mean=m.get("test_mse_mean"),
                metrics={k: v for k, v in m.items() if k.startswith(("test_", "baseline_", "protocol_"))},
                # As URIs: Ray's paths on object storage lack the scheme (s3://), and a Checkpoint or
                # pyarrow given one without it looks on the local disk.
                checkpoint=uri_of(r.checkpoint.path, r.checkpoint.filesystem) if r.checkpoint else None,
                error=_last_line(r.error),
                path=uri_of(str(r.path), getattr(r, "filesystem", None)),
                samples=_samples(m),
                finished=bool(finished) and r.checkpoint is not None,
            )
        )
    return sorted(rows, key=lambda row: row.seed)


def pick_best_seed(seeds: list[SeedResult]) -> SeedResult:
    """The seed whose weights become best_model.pt: lowest *validation* MSE among seeds that finished."""
    finished = [s for s in seeds if s.finished and s.checkpoint and s.val_mse is not None and not s.error]
    if not finished:
        errors = "; ".join(f"seed {s.seed}: {s.error}" for s in seeds if s.error) or "none finished"
        raise BssError(f"no retrain seed finished with a checkpoint ({errors}): see the retrain/ folder")
    return min(finished, key=lambda s: (s.val_mse, s.seed))


def retrain_summary(seeds: list[SeedResult]) -> RetrainSummary:
    return RetrainSummary(seeds=seeds, best=pick_best_seed(seeds))
