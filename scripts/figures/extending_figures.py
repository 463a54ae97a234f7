"""The worked examples of docs/extending.md ("Add a loss or a training method") measured on real MNIST, next to
the default: t10k test accuracy and wall time per run, written into that page's generated block.

    python scripts/figures/extending_figures.py --mnist ../shared/datasets/mnist          # ~6 min on 2 cores
    python scripts/figures/extending_figures.py --mnist ../shared/datasets/mnist --seeds 0 --no-docs

Every run is an ordinary ``python -m mnist_lit fit`` process on one torch thread, one at a time, timed from
launch to exit (fit and its test pass). The teacher of the distillation row is a ``mlp_99.yaml`` run (its own
row); the student is the default MLP trained against it with ``distill.yaml``.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generated_block import header, publish

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DOC = REPO / "docs" / "extending.md"


def fit(logs: Path, data: Path, seed: int, *configs: str, extra: tuple[str, ...] = ()) -> dict:
    """One run; its metrics.json, with the wall time from launch to exit."""
    args = [sys.executable, "-m", "mnist_lit", "fit", "--config", str(CONFIGS / "default.yaml"),
            *(a for c in configs for a in ("--config", str(CONFIGS / c))),
            "--seed_everything", str(seed), "--torch_threads", "1", "--data.data_dir", str(data),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs), *extra]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    folder = re.search(r"Run folder: (\S+)", done.stdout)[1]
    record = json.loads((Path(folder) / "metrics.json").read_text())
    return {"test_acc": record["metrics"]["test/acc"], "wall": wall, "best": record["best_checkpoint"]}


def cell(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="folder of the four MNIST .gz files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-docs", action="store_true", help="print the block only")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        (data / "MNIST" / "raw").mkdir(parents=True)
        for f in Path(options.mnist).glob("*-ubyte.gz"):
            shutil.copyfile(f, data / "MNIST" / "raw" / f.name)
        logs = Path(tmp) / "logs"
        teacher = fit(logs, data, 0, "experiment/mlp_99.yaml")
        rows = {"`default.yaml` (cross-entropy, 784-512-256)": [],
                "`+ focal.yaml`: `FocalClassifier`, overrides `loss` (γ 2)": [],
                "`+ distill.yaml`: `Distillation`, overrides `model_step` (T 4, α 0.9), teacher below": []}
        for seed in options.seeds:
            for runs, configs in zip(rows.values(), ([], ["examples/focal.yaml"], ["examples/distill.yaml"]),
                                     strict=True):
                extra = ("--model.teacher_checkpoint", teacher["best"]) if configs == ["examples/distill.yaml"] else ()
                runs.append(fit(logs, data, seed, *configs, extra=extra))
        rows["teacher: `+ mlp_99.yaml` (1024-1024, affine augmentation, 30 epochs), seed 0"] = [teacher]
    seeds = " ".join(map(str, options.seeds))
    lines = [header("figures/extending_figures.py", "real MNIST, one torch thread, one run at a time"),
             f"| run (seeds {seeds} unless said) | t10k test accuracy | wall time per run, launch to exit "
             "(fit + test) |",
             "|---|---|---|"]
    lines += [f"| {label} | {cell([r['test_acc'] for r in runs], 4)} | {cell([r['wall'] for r in runs], 1)} s |"
              for label, runs in rows.items()]
    publish(DOC, "figures/extending_figures.py", lines, print_only=options.no_docs)


if __name__ == "__main__":
    main()
