"""Ray's W&B callback for ``tune.callbacks.wandb`` (search/trackers.py): its own module, as it imports wandb."""

from __future__ import annotations

from typing import Any

from ray.air.integrations.wandb import WandbLoggerCallback


class WandbTracker(WandbLoggerCallback):
    """Ray's WandbLoggerCallback, but ``mode: offline`` (or ``disabled``) needs no API key.

    Ray looks for a key in its setup unless ``$WANDB_MODE`` says offline, and setting that variable is the
    process's business (an entry point's), not a callback's. Offline, nothing is uploaded: no key is read.
    """

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if self.kwargs.get("mode") not in ("offline", "disabled"):
            super().setup(*args, **kwargs)
            return
        self.api_key_file = None  # what Ray's setup would leave here
