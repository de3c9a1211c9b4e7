"""The main job on a disk that fills up -- for machines where the test cannot mount a small tmpfs (not root).

    python tests/_full_disk_run.py MARKER <search/run.py arguments>

This is ``search/run.py`` with every upload to the experiment's storage (Ray's ``_pyarrow_fs_copy_files``, which
both the driver's syncs of Tune's state and the trials' checkpoint uploads go through) failing with ENOSPC,
"No space left on device", for as long as the file MARKER exists: the test creates it to fill the disk and
deletes it to free space. The driver is patched here; each trial's worker process patches itself in
``train_trial`` (defined in __main__, it reaches the workers by value, as in tests/_faulty_run.py).

What this fault cannot do is cut a file half-way, as a real full disk does: tests/test_integrity.py checks that
part on a real write failure (``test_tune_writes_a_local_experiment_whole_or_not_at_all``).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import search.tuners
from search.run import main

MARKER = Path(sys.argv[1])


def fill_when_marked() -> None:
    import ray.train._internal.storage as ray_storage

    real = ray_storage._pyarrow_fs_copy_files
    if getattr(real, "_full_disk", False):
        return

    def copy(source: Any, destination: Any, **kwargs: Any) -> Any:
        if kwargs.get("destination_filesystem") is not None and MARKER.exists():
            raise OSError(errno.ENOSPC, "No space left on device (tests/_full_disk_run.py)")
        return real(source, destination, **kwargs)

    copy._full_disk = True  # type: ignore[attr-defined]
    ray_storage._pyarrow_fs_copy_files = copy


def train_trial(params: dict[str, Any], base: dict[str, Any], evaluate_test: bool = False, **kwargs: Any) -> None:
    import search.trainable as trainable

    fill_when_marked()  # in this worker process
    trainable.train_trial(params, base, evaluate_test, **kwargs)


if __name__ == "__main__":
    fill_when_marked()
    search.tuners.train_trial = train_trial
    raise SystemExit(main(sys.argv[2:]))
