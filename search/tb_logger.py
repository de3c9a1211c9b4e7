"""TensorBoard over an experiment: one run per trial, and the search alone in the HPARAMS tab.

``tensorboard --logdir results/<name>`` shows ``search/007-f785168e`` for each search trial and
``retrain/seed-1000`` for each retrain seed: the trial folders are named so (``search.console.trial_label``
and ``seed_label``) and hold both Tune's event file (``ray/tune/*``, written by this callback in the
driver) and the trial's own (``mse/*``, ``lr``, ``perf/*``, the ``val/separation`` images, written by
the trainable in the same folder).

TensorBoard keeps one hparams experiment per logdir. Only search trials write one (every search
dimension, declared when the trial starts, so a trial that errors early still has its row); the
retrain's seeds write none, or theirs (``train.seed`` alone) could be the one TensorBoard shows.
"""

from __future__ import annotations

from typing import Any

from ray.tune.logger import TBXLoggerCallback

# The columns of the HPARAMS tab: the trial's own curves (same run) and Tune's epoch count.
HPARAM_METRICS = ("mse/val", "mse/train", "ray/tune/epoch")


class TensorBoardLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger, with the hparams of the search's dimensions only (``hparams=False``: none).

    Passed in the run config, it replaces the TBXLoggerCallback Tune would add by default.
    """

    def __init__(self, hparams: bool) -> None:
        super().__init__()
        self.hparams = hparams

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)
        if not self.hparams:
            return
        from tensorboardX.summary import hparams

        params = {k: _plain(v) for k, v in (trial.evaluated_params or {}).items()}
        experiment, session_start, _ = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        writer = self._trial_writer[trial].file_writer
        writer.add_summary(experiment)
        writer.add_summary(session_start)
        writer.flush()

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        """At a trial's end, in place of Tune's hparams (all of them again, with every metric it reported):
        the end of the session declared at its start."""
        if not self.hparams:
            return
        from tensorboardX.summary import hparams

        params = {k: _plain(v) for k, v in (trial.evaluated_params or {}).items()}
        _, _, session_end = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        self._trial_writer[trial].file_writer.add_summary(session_end)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers: the hparams summary takes str, bool and numbers only."""
    return value.item() if hasattr(value, "item") else value
