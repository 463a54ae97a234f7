"""Callbacks for tests/test_distributed.py and tests/test_requeue.py: a process that hangs at exit, as a stuck
shutdown would; one rank that fails at exit after its results, as a teardown error would; a torchrun worker that
dies once, as a fault would."""

import atexit
import os
import sys
import time

from lightning.pytorch import Callback


class HangAtExit(Callback):
    def on_fit_end(self, trainer, pl_module):
        atexit.register(time.sleep, 3600)


class FailOnRank(Callback):
    """The process of global rank ``rank`` exits with code 3 at interpreter exit.

    Args:
        rank: the global rank that fails.
    """

    def __init__(self, rank: int = 1):
        self.rank = rank

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            atexit.register(fail, self.rank)


def fail(rank: int) -> None:
    print(f"FailOnRank: rank {rank} fails on purpose", file=sys.stderr, flush=True)
    os._exit(3)


class FailOnceAtEpoch(Callback):
    """The first attempt of a torchrun worker (``TORCHELASTIC_RESTART_COUNT`` 0) dies at the start of epoch
    ``epoch``, as a worker lost to a fault would; restarted, or outside torchrun, it does nothing.

    Args:
        epoch: the epoch at whose start the first attempt dies.
    """

    def __init__(self, epoch: int = 2):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os._exit(1)
