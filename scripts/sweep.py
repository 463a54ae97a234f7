"""A grid of overrides x seeds, each run a separate `python -m mnist_lit fit`, N at a time; then a CSV and a
Markdown table of mean ± std per configuration.

    python scripts/sweep.py --name lr --grid model.optimizer.init_args.lr=0.05,0.1,0.2 --seeds 0 1 2 --parallel 2
    python scripts/sweep.py --name recipe --config configs/default.yaml --config configs/experiment/mlp_99.yaml \\
        --seeds 0 1 2 -- --trainer.max_epochs 20

Each run lives in logs/sweeps/<name>/<configuration>/seed<S>/ (a normal run folder: TensorBoard events,
config.yaml, checkpoints, metrics.json) beside its console log seed<S>.log. A run counts as finished when
its metrics.json exists; running the same command again skips finished runs, resumes an interrupted one
from its last.ckpt (exactly, batch for batch) and starts the rest, then rewrites results.csv and
results.md. Ctrl-C stops every run at a step boundary with a last.ckpt to resume from. Arguments after
`--` go to every run. Runs use one torch thread each (--torch_threads 1, unless given after `--`), so
--parallel up to the number of cores does not oversubscribe them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("test/acc", "val/acc_best", "test/loss")  # summarized per configuration, with the wall time


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            sys.exit(f"error: --grid {item!r} is not KEY=V1,V2,...; e.g. --grid model.optimizer.init_args.lr=0.05,0.1")
        grid[key.removeprefix("--")] = values.split(",")
    return grid


def configuration_name(overrides: dict[str, str]) -> str:
    """A folder name that says what differs, e.g. 'lr=0.1,hidden1=512' ('default' for no overrides)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts)) or "default"


class Run:
    def __init__(self, root: Path, overrides: dict[str, str], seed: int):
        self.overrides, self.seed = overrides, seed
        self.configuration = configuration_name(overrides)
        self.folder = root / self.configuration / f"seed{seed}"
        self.console = self.folder.with_suffix(".log")
        self.metrics_file = self.folder / "metrics.json"
        self.wall_file = self.folder.with_suffix(".wall_s")

    def finished(self) -> bool:
        return self.metrics_file.is_file()

    def command(self, configs: list[str], passthrough: list[str]) -> list[str]:
        command = [sys.executable, "-m", "mnist_lit", "fit"]
        for config in configs:
            command += ["--config", config]
        for key, value in self.overrides.items():
            command += [f"--{key}", value]
        command += ["--seed_everything", str(self.seed), "--torch_threads", "1",
                    "--trainer.logger.init_args.save_dir", str(self.folder.parent.parent),
                    "--trainer.logger.init_args.name", self.configuration,
                    "--trainer.logger.init_args.version", self.folder.name,
                    "--trainer.enable_progress_bar", "false", *passthrough]
        last = self.folder / "checkpoints" / "last.ckpt"
        if last.is_file():  # interrupted: continue where it stopped, in the same folder
            config = self.folder / "config.yaml"  # Lightning refuses to overwrite it; keep the first one
            if config.is_file():
                config.rename(self.folder / f"config.before-resume-{int(time.time())}.yaml")
            return command + ["--ckpt_path", str(last)]
        if self.folder.exists():  # stopped before its first checkpoint: keep it aside, start again
            self.folder.rename(self.folder.with_name(f"{self.folder.name}.incomplete-{int(time.time())}"))
        return command

    def record(self) -> dict:
        row = {"configuration": self.configuration, **self.overrides, "seed": self.seed}
        if not self.finished():
            return row | {"status": "failed", "run_folder": str(self.folder)}
        metrics = json.loads(self.metrics_file.read_text())["metrics"]
        wall = float(self.wall_file.read_text()) if self.wall_file.is_file() else float("nan")
        return row | {"status": "ok", **{m: metrics.get(m) for m in METRICS}, "wall_s": round(wall, 1),
                      "run_folder": str(self.folder)}


def run_all(runs: list[Run], configs: list[str], passthrough: list[str], parallel: int) -> None:
    pending = [run for run in runs if not run.finished()]
    print(f"{len(runs)} runs: {len(runs) - len(pending)} already finished, {len(pending)} to run, "
          f"{parallel} at a time", flush=True)
    active: dict[subprocess.Popen, tuple[Run, float]] = {}
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                run.console.parent.mkdir(parents=True, exist_ok=True)
                with run.console.open("a") as log:
                    process = subprocess.Popen(run.command(configs, passthrough), stdout=log,
                                               stderr=subprocess.STDOUT, cwd=REPO)
                active[process] = (run, time.perf_counter())
            time.sleep(0.2)
            for process in [p for p in active if p.poll() is not None]:
                run, started = active.pop(process)
                wall = time.perf_counter() - started
                if process.returncode == 0 and run.finished():
                    run.wall_file.write_text(f"{wall:.2f}\n")
                    print(f"done    {run.configuration} seed {run.seed} ({wall:.0f} s)", flush=True)
                else:
                    print(f"FAILED  {run.configuration} seed {run.seed} (exit {process.returncode}): see "
                          f"{run.console}", flush=True)
    except KeyboardInterrupt:  # the runs got the Ctrl-C too: wait while they write last.ckpt
        for process in active:
            process.wait()
        sys.exit("Interrupted: run the same command again to resume.")


def summarize(records: list[dict], keys: list[str]) -> str:
    """Markdown: one row per configuration, mean ± std (sample std over seeds) of each metric."""
    header = ["configuration", *keys, "seeds", *METRICS, "wall_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in itertools.groupby(records, key=lambda r: r["configuration"]):
        group = list(group)
        done = [r for r in group if r["status"] == "ok"]
        cells = [name, *(str(group[0].get(k, "")) for k in keys), f"{len(done)}/{len(group)}"]
        for metric in (*METRICS, "wall_s"):
            values = [r[metric] for r in done if r[metric] is not None]
            if not values:
                cells.append("–")
                continue
            digits = 1 if metric == "wall_s" else 4
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.{digits}f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python scripts/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the sweep's folder under --root")
    parser.add_argument("--config", action="append", help="config files, in order (default: configs/default.yaml)")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeat for a product)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (each uses one CPU thread)")
    parser.add_argument("--root", default=str(REPO / "logs" / "sweeps"))
    options = parser.parse_args(argv)
    if options.parallel < 1:
        parser.error("--parallel must be at least 1")
    configs = [str(Path(c).resolve()) for c in options.config or [REPO / "configs" / "default.yaml"]]
    grid = parse_grid(options.grid)
    root = Path(options.root) / options.name
    runs = [Run(root, dict(zip(grid, values, strict=True)), seed)
            for values in itertools.product(*grid.values()) for seed in options.seeds]
    run_all(runs, configs, passthrough, options.parallel)

    records = [run.record() for run in runs]
    fields = list(dict.fromkeys(k for r in records for k in r))
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(records)
    table = summarize(records, list(grid))
    (root / "results.md").write_text(table)
    print(f"\n{table}\nAll runs: {root / 'results.csv'}")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} runs failed; their console logs are seed<S>.log beside their folders. Run the same "
              "command again to retry them.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
