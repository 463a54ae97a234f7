"""A callback for tests/test_distributed.py: makes the process hang at exit, as a stuck shutdown would."""

import atexit
import time

from lightning.pytorch import Callback


class HangAtExit(Callback):
    def on_fit_end(self, trainer, pl_module):
        atexit.register(time.sleep, 3600)
