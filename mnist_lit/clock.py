"""Where a run's seconds go, from the process's launch: start-up, training, validation, test and the rest.

    python -m mnist_lit fit --config configs/default.yaml    # metrics.json: "seconds": {"start_up": ..., ...}

``curve`` is each epoch's val/acc with the seconds since launch at which it was known: accuracy against time.
``start_up`` runs from the process's creation (the interpreter, the imports, the config, the data) to the fit's
start; ``train`` is the training epochs without the validation inside them; ``validation`` includes Lightning's
sanity check; ``test`` is the fit's test pass; ``other`` is what is left until the results are written (the
checkpoints, the pictures, the loggers). ``total`` is launch to ``metrics.json``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import psutil


def seconds_since_launch() -> float:
    """How long ago this process was created, to the kernel's clock tick: its start time in ticks since boot
    (/proc/self/stat) against the boot clock. (psutil's create_time adds that to the boot time in whole seconds, so
    it can be up to a second off.) Elsewhere than Linux, psutil's."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - psutil.Process().create_time()


class RunClock(L.Callback):
    """Wall seconds per part of a run (module docstring), read with ``seconds()``; the CLI adds one to every run."""

    def __init__(self):
        self.launched = time.time() - seconds_since_launch()  # wall clock, seconds since the epoch
        self.spent: dict[str, float] = defaultdict(float)
        self.since: dict[str, float] = {}
        self.curve: list[tuple[float, float]] = []  # (seconds since launch, val/acc) after each epoch's validation
        self.first_step: int | None = None  # the global step training started from in this process (a resume's)

    def start(self, part: str) -> None:
        self.since[part] = time.time()

    def stop(self, part: str) -> float:
        took = time.time() - self.since.pop(part, time.time())
        self.spent[part] += took
        return took

    def on_fit_start(self, trainer, pl_module) -> None:
        self.spent["start_up"] = time.time() - self.launched

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step

    def stepped(self, trainer) -> bool:
        """Whether this process took a training step (the run folder then holds something worth keeping)."""
        return self.first_step is not None and trainer.global_step > self.first_step

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start("train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stop("train")

    def on_validation_start(self, trainer, pl_module) -> None:
        self.start("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        took = self.stop("validation")
        if "train" in self.since:  # validation inside a training epoch: not training time
            self.spent["train"] -= took
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self.curve.append((round(time.time() - self.launched, 2), trainer.callback_metrics["val/acc"].item()))

    def on_test_start(self, trainer, pl_module) -> None:
        self.start("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self.stop("test")

    def seconds(self) -> dict[str, float]:
        total = time.time() - self.launched
        parts = {part: self.spent.get(part, 0.0) for part in ("start_up", "train", "validation", "test")}
        return {k: round(v, 2) for k, v in (parts | {"other": total - sum(parts.values()), "total": total}).items()}
