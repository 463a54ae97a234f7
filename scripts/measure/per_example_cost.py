"""What per-example results cost a default fit: the time to write per_example/test.csv (10,000 rows, once per
fit) and per_example/val.csv (5,000 rows, once per fit) through mnist_lit.per_example.PerExample.write, on one
thread, against the default fit's wall time given on the command line (the README's time-to-accuracy figure).

    python scripts/measure/per_example_cost.py --fit-seconds 30
"""

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mnist_lit.per_example import PerExample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-seconds", type=float, required=True, help="a default fit's wall time, seconds")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        trainer = SimpleNamespace(world_size=1, fast_dev_run=False, loggers=[], log_dir=folder, datamodule=None,
                                  ckpt_path=None)
        for split, rows in (("test", 10_000), ("val", 5_000)):
            logits = torch.randn(rows, 10)
            parts = [(logits[i:i + 1000].softmax(dim=1), torch.randint(0, 10, (len(logits[i:i + 1000]),)))
                     for i in range(0, rows, 1000)]
            spent = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                PerExample().write(trainer, split, parts, 0, 0, hashlib.sha256().digest())
                spent.append(time.perf_counter() - started)
            times[split] = statistics.median(spent)
            assert Path(folder, "per_example", f"{split}.csv").is_file()
    total = sum(times.values())
    print(f"per_example/test.csv (10,000 rows): {times['test'] * 1000:.0f} ms; per_example/val.csv (5,000 rows): "
          f"{times['val'] * 1000:.0f} ms (median of {args.repeats}); together {total * 1000:.0f} ms, "
          f"{100 * total / args.fit_seconds:.2f} % of a {args.fit_seconds:g} s fit")


if __name__ == "__main__":
    main()
