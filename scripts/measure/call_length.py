"""How many SGD steps one fast-path call should take: the fast path's epoch against a plain PyTorch loop's epoch
run in the same process, on the same batches, for several ``--model.steps_per_training_step``.

    python scripts/measure/call_length.py                      # ~7 min on 2 cores; rewrites docs/benchmarks.md's block
    python scripts/measure/call_length.py --steps 64 256 --batch-sizes 64 --repeats 1 --no-docs

Each run is one ``python -m mnist_lit fit`` of the default config (progress bar and logger on, validation off)
with ``bench_probe.PlainBeside``: after each training epoch it trains a copy of the network for one epoch with a
plain loop, so that the two epochs of a pair run in the same process, one after the other, with weights that
follow the same path. The figure per run is the median over its epochs after the first of fast path / plain
loop; the table gives the min and median of that over repeats (the runs of a repeat back to back, every other
repeat in reverse order). benchmark.py compares whole processes; this compares inside one, where what differs
between processes (memory layout, a busy neighbour's timing) cancels out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))  # the docs' blocks: scripts/figures/
from generated_block import header, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"


def run(data: Path, work: Path, steps: int, batch: int, threads: int, epochs: int,
        *extra: str) -> tuple[float, list[float]]:
    """fast/plain per epoch of one fit process (the median over its epochs after the first), and the plain
    loop's seconds per epoch."""
    probe = work / "probe.json"
    argv = [sys.executable, "-m", "mnist_lit", "fit", "--config", "configs/default.yaml",
            "--data.data_dir", str(data), "--data.download", "false", "--data.batch_size", str(batch),
            "--trainer.max_epochs", str(epochs), "--torch_threads", str(threads),
            "--model.steps_per_training_step", str(steps), "--trainer.limit_val_batches", "0",
            "--test_after_fit", "false", "--trainer.logger.init_args.save_dir", str(work / "logs"),
            "--trainer.callbacks+=bench_probe.PlainBeside", *extra]
    with (work / "log.txt").open("w") as log:
        done = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(REPO / "scripts" / "measure"),
                                   "BENCHMARK_PROBE_OUT": str(probe)})
    if done.returncode != 0:
        sys.exit(f"call_length: {' '.join(argv)} failed; its output is in {work / 'log.txt'}")
    times = json.loads(probe.read_text())
    ratio = statistics.median(f / p for f, p in zip(times["fast_s"][1:], times["plain_s"][1:], strict=True))
    return ratio, times["plain_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="holds MNIST/raw/*-ubyte[.gz]")
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print the block, do not rewrite docs/benchmarks.md")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mnist_lit_calls_"))
    # Row label -> (steps per call, extra fit arguments); the last row: a subclass that overrides only the loss
    # (label smoothing, bench_probe.LabelSmoothing) at the longest call, the plain loop beside it with that loss.
    rows = {str(steps): (steps, ()) for steps in options.steps}
    rows[f"{max(options.steps)}, a subclass that overrides only the loss"] = (
        max(options.steps), ("--model", "bench_probe.LabelSmoothing"))
    cases = [(batch, row) for batch in options.batch_sizes for row in rows]
    ratios: dict[tuple, list[float]] = {case: [] for case in cases}
    plain: dict[int, list[list[float]]] = {batch: [] for batch in options.batch_sizes}  # per run, per epoch
    for repeat in range(options.repeats):
        for batch, row in cases if repeat % 2 == 0 else cases[::-1]:
            steps, extra = rows[row]
            folder = work / f"b{batch}-s{steps}-{len(extra)}-r{repeat}"
            folder.mkdir()
            ratio, plain_s = run(Path(options.data_dir), folder, steps, batch, options.threads, options.epochs, *extra)
            ratios[batch, row].append(ratio)
            if not extra:  # cross-entropy runs only: the plain loop's own epochs
                plain[batch].append(plain_s)
            print(f"batch {batch}, {row} steps/call, repeat {repeat}: {ratio:.3f}", flush=True)
    columns = " | ".join(f"batch {b}: fast / plain, min / median" for b in options.batch_sizes)
    lines = [header("measure/call_length.py", f"{options.threads} torch threads, {options.epochs} epochs a run, "
                                      f"{options.repeats} repeats"),
             "", f"| steps per call, at most | {columns} |", "|---|" + "---|" * len(options.batch_sizes)]
    for row in rows:
        cells = [f"{min(ratios[b, row]):.3f} / {statistics.median(ratios[b, row]):.3f}" for b in options.batch_sizes]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    # The plain loop's epochs grow slower as training goes (subnormal floats, docs/benchmarks.md): the median run's.
    epochs = {b: ", ".join(f"{statistics.median(run[e] for run in plain[b]):.2f}" for e in range(options.epochs))
              for b in options.batch_sizes}
    lines += ["", "Plain loop, seconds per epoch in turn (median over the runs): "
              + "; ".join(f"batch {b}: {seconds}" for b, seconds in epochs.items()) + "."]
    publish(DOC, "measure/call_length.py", lines, print_only=options.no_docs)


if __name__ == "__main__":
    main()
