"""The 99.3 % study on real MNIST (data/MNIST/raw; scripts/setup.sh), every step an ordinary
``python -m mnist_lit.search`` command, and the figures it leaves in the README and docs/search-993.md:

  1. proxies: configs/search/mlp_993.yaml, 12-epoch fits with median pruning, 2 workers (one thread each);
  2. the best few at full length: the proxy study's top --finalists by val/acc_best, each at each of --epochs,
     two at a time, scored on val alone (no test pass);
  3. the configs that came out of it, configs/experiment/mlp_993.yaml (the best of step 2, at its length) and
     mlp_990.yaml (the best proxy, at its 12 epochs: the fastest past 99.0 %), each over seeds 0 1 2,
     one at a time with 2 torch threads (the whole machine, as on a researcher's own): the test set is read here
     alone, once per run.

    python scripts/figures/search_993.py              # about 45 minutes on 2 cores; a finished study is not run again
    python scripts/figures/search_993.py --only-docs  # rewrite the figures from the studies' own tables

Run again, a finished study only rewrites its tables, so the figures can be regenerated without training.
"""

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "figures"))
from generated_block import header, replace_block  # noqa: E402

ROOT = REPO / "logs" / "search"
BASE = ["--config", "configs/default.yaml", "--config", "configs/experiment/mlp_99.yaml"]
AUGMENT = ["--data.augment", "mnist_lit.augment.ElasticAffine"]
DATA = ["--data.data_dir", "data"]
PROXY_EPOCHS = 12
RECIPES = {"mlp993": "configs/experiment/mlp_993.yaml", "mlp990": "configs/experiment/mlp_990.yaml"}


def search(*args: str, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "mnist_lit.search", *args]
    print("+", " ".join(command), flush=True)
    child = subprocess.Popen(command, cwd=REPO)
    return finish(child) if wait else child


def finish(child: subprocess.Popen) -> subprocess.Popen:
    if child.wait() != 0:
        sys.exit(f"search_993: {' '.join(child.args)} failed (exit {child.returncode}); its runs' logs are under "
                 "logs/search/")
    return child


def trials(name: str) -> list[dict]:
    return list(csv.DictReader((ROOT / name / "trials.csv").open()))


def finalists(count: int) -> list[dict]:
    done = [t for t in trials("mlp993-proxy") if t["state"] == "COMPLETE"]
    return sorted(done, key=lambda t: -float(t["val/acc_best"]))[:count]


def values(trial: dict) -> list[str]:
    """A proxy trial's searched values as fit arguments."""
    keys = yaml.safe_load((REPO / "configs/search/mlp_993.yaml").read_text())["space"]
    return [part for key in keys for part in (f"--{key}", trial[key])]


def long_name(trial: dict) -> str:
    return f"mlp993-long-trial{trial['trial']}"


def two_at_a_time(commands: list[list[str]]) -> None:
    """``python -m mnist_lit.search`` with each argument list, two commands running at a time."""
    running = []
    for arguments in commands:
        running.append(search(*arguments, wait=False))
        if len(running) == 2:
            finish(running.pop(0))
    for child in running:
        finish(child)


def run_long(finalist_trials: list[dict], epochs: list[int]) -> None:
    """Each finalist over every --epochs, as a grid of one seed (seed 0), two studies at a time."""
    grid = "trainer.max_epochs=" + ",".join(map(str, epochs))
    two_at_a_time([["--name", long_name(trial), *BASE, "--grid", grid, "--seeds", "0", "--workers", "1", "--",
                    *AUGMENT, *DATA, *values(trial), "--test_after_fit", "false"] for trial in finalist_trials])


def long_rows(finalist_trials: list[dict]) -> list[dict]:
    rows = []
    for trial in finalist_trials:
        for row in csv.DictReader((ROOT / long_name(trial) / "results.csv").open()):
            rows.append({"trial": trial["trial"], "proxy": float(trial["val/acc_best"]),
                         "epochs": int(row["trainer.max_epochs"]), "val": float(row["val/acc_best"]),
                         "wall_s": float(row["wall_s"])})
    return rows


def seeds(name: str) -> dict:
    """mean ± std of the 3-seed retrain, from its results.md row, and each seed's test/acc."""
    line = (ROOT / f"{name}-seeds" / "results.md").read_text().splitlines()[2].split(" | ")
    runs = list(csv.DictReader((ROOT / f"{name}-seeds" / "results.csv").open()))
    return {"test": line[2], "val": line[3], "wall": line[-1].rstrip(" |"),
            "each": ", ".join(f"{float(r['test/acc']):.4f}" for r in runs)}


def counts(name: str) -> tuple[str, str]:
    top = (ROOT / name / "top.md").read_text()
    return (re.search(r"(\d+ complete, \d+ pruned, \d+ failed)", top).group(1),
            re.search(r"last one's end: (\d+) s", top).group(1))


def draw_curves(path: Path) -> None:
    """val/acc of every epoch against the run's wall time, for each retrained run (its TensorBoard events)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, colour in zip(RECIPES, ("tab:blue", "tab:orange"), strict=True):
        for run in sorted((ROOT / f"{name}-seeds").glob("default/seed*/")):
            events = EventAccumulator(str(run))
            events.Reload()
            points = events.Scalars("val/acc")
            start = events.FirstEventTimestamp()  # the logger's start, just before the first epoch
            axes.plot([(p.wall_time - start) / 60 for p in points], [p.value for p in points], color=colour,
                      alpha=0.7, label=f"{name} ({run.name})")
    axes.set(xlabel="minutes since the run's logger started (after start-up)", ylabel="val/acc", ylim=(0.985, 0.996))
    axes.axhline(0.99, color="grey", linewidth=0.5)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_docs(finalist_trials: list[dict]) -> None:
    count, span = counts("mlp993-proxy")
    long = long_rows(finalist_trials)
    results = {name: seeds(name) for name in RECIPES}
    readme_rows = ["| config (2-core CPU, 2 threads, one run at a time) | t10k test accuracy, seeds 0 1 2 | "
                   "best val acc | wall time per run, launch to result |", "|---|---|---|---|"]
    for name, config in RECIPES.items():
        r = results[name]
        readme_rows.append(f"| `{config}` | **{r['test']}** ({r['each']}) | {r['val']} | {r['wall']} s |")
    top = header("figures/search_993.py", "real MNIST, `python scripts/figures/search_993.py`")
    replace_block(REPO / "README.md", "figures/search_993.py", [top, *readme_rows])
    doc = ["| stage | what ran | figures |", "|---|---|---|",
           f"| 1. proxies | `configs/search/mlp_993.yaml`, {PROXY_EPOCHS} epochs, median pruning, 2 workers | "
           f"{count}; {int(span) / 60:.1f} min, first start to last end |"]
    chosen = max(long, key=lambda row: (row["val"], row["proxy"]))  # a tie on val goes to the better proxy
    for row in long:
        doc.append(f"| 2. full length | proxy trial {row['trial']} (proxy val {row['proxy']:.4f}), "
                   f"{row['epochs']} epochs, 1 thread, two runs at a time | val/acc_best {row['val']:.4f}, "
                   f"{row['wall_s']:.0f} s{' (chosen: mlp_993.yaml)' if row is chosen else ''} |")
    for name, config in RECIPES.items():
        r = results[name]
        doc.append(f"| 3. retrained | `{config}`, seeds 0 1 2, 2 threads | t10k {r['test']} ({r['each']}), "
                   f"val {r['val']}, {r['wall']} s per run |")
    details = ["\n".join(doc), "", "### Stage 1, `logs/search/mlp993-proxy/top.md`", "",
               (ROOT / "mlp993-proxy" / "top.md").read_text(),
               "![proxy study: optimization history](search-993-history.png) "
               "![proxy study: parameter importances](search-993-importances.png)", ""]
    details += ["![val/acc against wall time of each retrained run](search-993-curves.png)", ""]
    for name in RECIPES:
        details += [f"### Stage 3, `logs/search/{name}-seeds/results.md`", "",
                    (ROOT / f"{name}-seeds" / "results.md").read_text()]
    replace_block(REPO / "docs" / "search-993.md", "figures/search_993.py", [top, *details])
    draw_curves(REPO / "docs" / "search-993-curves.png")
    for plot in ("history", "importances"):
        (REPO / "docs" / f"search-993-{plot}.png").write_bytes((ROOT / "mlp993-proxy" / f"{plot}.png").read_bytes())
    print(json.dumps({"long": long, "results": results}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24, help="proxy trials (COMPLETE + PRUNED)")
    parser.add_argument("--finalists", type=int, default=3, help="proxy trials run again at full length")
    parser.add_argument("--epochs", type=int, nargs="+", default=[60], help="the full-length stage's epochs")
    parser.add_argument("--only-docs", action="store_true", help="rewrite the figures; train nothing")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="the stages to run (1 2 3)")
    args = parser.parse_args()
    if not args.only_docs:
        if 1 in args.stages:
            search("--name", "mlp993-proxy", "--space", "configs/search/mlp_993.yaml", "--trials", str(args.trials),
                   "--workers", "2", *BASE, "--", *AUGMENT, "--trainer.max_epochs", str(PROXY_EPOCHS), *DATA)
        if 2 in args.stages:
            run_long(finalists(args.finalists), args.epochs)
        for name, config in RECIPES.items() if 3 in args.stages else ():
            search("--name", f"{name}-seeds", "--config", "configs/default.yaml", "--config", config, "--seeds",
                   "0", "1", "2", "--workers", "1", "--", "--torch_threads", "2", "--data.data_dir", "data")
    if 3 in args.stages or args.only_docs:
        write_docs(finalists(args.finalists))


if __name__ == "__main__":
    main()
