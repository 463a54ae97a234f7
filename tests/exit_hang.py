"""Callbacks for tests/test_distributed.py: a process that hangs at exit, as a stuck shutdown would, and one
rank that fails at exit after its results, as a teardown error would."""

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
