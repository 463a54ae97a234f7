"""metrics.json says where a run's seconds went, from the process's launch, and when each val/acc was known."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import fit_args, only_run


@pytest.mark.slow
def test_a_fits_seconds_add_up_to_its_launch_to_result_time_and_its_curve_is_tensorboards(tiny_mnist: Path,
                                                                                         tmp_path: Path):
    launched = time.time()
    done = subprocess.run([sys.executable, "-m", "mnist_lit", *fit_args(tiny_mnist, tmp_path / "logs",
                                                                       "--trainer.max_epochs", "3")],
                          capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(tmp_path / "logs")
    record = json.loads((run / "metrics.json").read_text())
    seconds = record["seconds"]
    parts = ("start_up", "train", "validation", "test", "other")
    assert all(seconds[part] > 0 for part in parts), seconds  # each part measured, the test pass too
    assert sum(seconds[part] for part in parts) == pytest.approx(seconds["total"], abs=0.05)
    assert seconds["total"] <= ended - launched + 0.05  # from the process's creation, before the results printed
    assert seconds["start_up"] > 1  # the interpreter and the imports are the launch's, counted in
    curve = record["val_acc_by_seconds"]
    events = EventAccumulator(str(run)).Reload()
    assert [acc for _, acc in curve] == pytest.approx([e.value for e in events.Scalars("val/acc")])
    times = [t for t, _ in curve]
    assert len(times) == 3 and times == sorted(times) and seconds["start_up"] < times[0] < seconds["total"]
