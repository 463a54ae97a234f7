"""The CLI's imports, made once with the cyclic garbage collector paused: what a process that will run
``mnist_lit.cli`` imports first (``python -m mnist_lit``, the fork server that a search's trials and the tests'
runs are forked from: mnist_lit/search/fork.py). A rank that ``ddp_spawn`` starts imports the CLI as it unpickles
its work, before any code of ours runs, so it pays the collector still.

Importing torch, Lightning and torchmetrics makes hundreds of thousands of objects, and the collector scans them
over and over while they load: a large part of a short run's start-up (docs/benchmarks.md). What they made is then
frozen: module-level objects live as long as the process anyway, so the collector never scans them again, in this
process or in any process forked from it. Everything a run makes later is collected as usual.
"""

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off while the block runs (imports), and what it made frozen after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


with collector_paused():
    import mnist_lit.cli  # noqa: F401
