"""A per-epoch progress bar for interactive training: samples/s, the epoch's running loss, and an ETA.

An epoch of the ``seed`` variant is over an hour on a 2-core CPU, and the plain log prints one line per
epoch: on a terminal the bar is the sign of life. Everywhere else (CI logs, Ray trials, files) it is off
and costs nothing, so logs keep their one clean line per epoch.

The bar never makes the training loop wait for the device. It advances by step *counts* (plain ints,
known on the host without a sync) and shows a loss only when the caller passes one, which the loop does
only where it already synchronises (its periodic non-finite check). On a GPU the host runs a little
ahead of the device, so the rate settles after the first few steps.

    bar = EpochProgress(epoch, epochs, steps, batch_size, enabled=sys.stderr.isatty())
    bar.update(step_done)                 # every step: cheap, redraws at most every ``mininterval`` s
    bar.update(step_done, running_loss)   # where the loss is already on the host
    bar.close()                           # clears the bar, so the epoch's log line follows cleanly
"""

from __future__ import annotations

import sys
from typing import TextIO

# tqdm fields: n/total are samples, so its rate is samples/s and its ETA covers the rest of the epoch.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]"


class EpochProgress:
    """One epoch's bar on ``stream`` (default stderr); a no-op unless ``enabled``."""

    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        batch_size: int,
        enabled: bool,
        stream: TextIO | None = None,
        mininterval: float = 0.5,
    ) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self._steps_done = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=steps * batch_size or None,  # 0 steps: an epoch that ends on time (no percentage, no ETA)
                desc=f"epoch {epoch}/{epochs}",
                unit=" samples",
                unit_scale=True,
                bar_format=BAR_FORMAT,
                file=stream if stream is not None else sys.stderr,
                mininterval=mininterval,
                leave=False,  # the epoch's log line replaces it
                dynamic_ncols=True,
                # A rate averaged over the last ~10 updates: steadier than the last step, quicker than the mean.
                smoothing=0.1,
            )

    def update(self, step_done: int, loss: float | None = None) -> None:
        """``step_done`` steps of this epoch are done; ``loss`` (if given) is its running mean train loss."""
        if self._bar is None:
            return
        if loss is not None:
            self._bar.set_postfix_str(f"loss {loss:.3e}", refresh=False)
        self._bar.update((step_done - self._steps_done) * self.batch_size)
        self._steps_done = step_done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
