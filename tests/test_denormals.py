"""Subnormal floats are flushed to zero on the CPU by default, in every torch thread, and kept with
--flush_denormal false; metrics.json records what was measured."""

import json

import pytest
import torch

from conftest import fit_args, only_run
from mnist_lit.cli import main
from mnist_lit.denormals import flushed, set_flush_denormal

THREADS = 2


@pytest.fixture
def two_threads():
    """torch at 2 threads with its OpenMP pool already started (as in any process that computed before), then the
    process's settings as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.ones(1 << 22).sum()  # starts the pool's workers before any setting is made
    yield
    torch.set_num_threads(before)
    set_flush_denormal(True)


def test_the_setting_reaches_every_worker_of_a_pool_that_already_runs(two_threads):
    tiny = torch.finfo(torch.float32).tiny
    torch.set_flush_denormal(False)
    set_flush_denormal(False)
    assert not flushed()  # IEEE 754: tiny / 2 is a subnormal
    torch.set_flush_denormal(True)  # torch's own call reaches only this thread: half the elements stay subnormal
    assert 0 < (torch.full((1 << 22,), tiny) * 0.5).count_nonzero() < 1 << 22
    assert set_flush_denormal(True)
    assert (torch.full((1 << 22,), tiny) * 0.5).count_nonzero() == 0  # every worker flushed
    assert set_flush_denormal(False) and not flushed()  # and back


@pytest.mark.parametrize(("flags", "expected"), [((), True), (("--flush_denormal", "false"), False)],
                         ids=["default", "off"])
def test_a_fit_flushes_by_default_and_metrics_json_says_what_was_measured(two_threads, tiny_mnist, tmp_path, flags,
                                                                          expected):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1", "--test_after_fit", "false", *flags)
    args[args.index("--torch_threads") + 1] = str(THREADS)
    main(args)
    record = json.loads((only_run(tmp_path / "logs") / "metrics.json").read_text())
    assert record["subnormals_flushed"] is expected
    assert flushed() is expected

