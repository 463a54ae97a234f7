"""The 99.5 % study on real MNIST (data/MNIST/raw; scripts/setup.sh), every step an ordinary
``python -m mnist_lit.search`` command, and the block it leaves in docs/search-995.md:

  1. proxies: configs/search/mlp_995.yaml, 60-epoch fits of mlp_993.yaml's kind in bf16 autocast with the
     elastic field on a 4-pixel grid, median pruning from the 25th epoch, 2 workers (one thread each);
  2. the best --finalists at full length: each trained for the FLOPs of --epochs epochs of mlp_993.yaml's
     widths (a wider finalist gets fewer epochs, so that each would take the same seconds), seed 0, one thread,
     two at a time, scored on val alone (no test pass);
  3. configs/experiment/mlp_995.yaml, the best of stage 2 at its length (its values to 4 digits), over seeds
     0 1 2, one fit at a time on the whole machine: ``scripts/measure/time_to_accuracy.py --only 99.5``, the one
     place where the test set is read, once per run.

    python scripts/figures/search_995.py --stages 1 2   # about 70 minutes on 2 cores; a finished study is not run again
    python scripts/measure/time_to_accuracy.py --only 99.5  # stage 3, alone on the machine: about 37 minutes
    python scripts/figures/search_995.py --only-docs    # the block, from the studies' tables and stage 3's records
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "figures"))
from generated_block import header, replace_block  # noqa: E402
from search_993 import counts, search, trials, two_at_a_time  # noqa: E402

ROOT = REPO / "logs" / "search"
SPACE = "configs/search/mlp_995.yaml"
BASE = ["--config", "configs/default.yaml", "--config", "configs/experiment/mlp_993.yaml"]
FAST = ["--trainer.precision", "bf16-mixed", "--data.augment.init_args.noise_spacing", "4", "--data.data_dir", "data"]
PROXY_EPOCHS, PROXY_TRIALS = 60, 18
REFERENCE_WIDTHS = (1278, 1032)  # mlp_993.yaml's
RECORDS = REPO / "docs" / "time-to-accuracy.json"
DOC = REPO / "docs" / "search-995.md"


def macs_per_image(hidden1: int, hidden2: int) -> int:
    return 28 * 28 * hidden1 + hidden1 * hidden2 + hidden2 * 10


def full_length(trial: dict, epochs: int) -> int:
    """The epochs that cost this finalist what ``epochs`` epochs of mlp_993.yaml's widths cost."""
    widths = int(trial["model.net.init_args.hidden1"]), int(trial["model.net.init_args.hidden2"])
    return round(epochs * macs_per_image(*REFERENCE_WIDTHS) / macs_per_image(*widths))


def finalists(count: int) -> list[dict]:
    done = [t for t in trials("mlp995-proxy") if t["state"] == "COMPLETE"]
    return sorted(done, key=lambda t: -float(t["val/acc_best"]))[:count]


def values(trial: dict) -> list[str]:
    keys = yaml.safe_load((REPO / SPACE).read_text())["space"]
    return [part for key in keys for part in (f"--{key}", trial[key])]


def long_name(trial: dict) -> str:
    return f"mlp995-long-trial{trial['trial']}"


def run_long(finalist_trials: list[dict], epochs: int) -> None:
    """Each finalist at its full length, seed 0, as a grid of one: two studies at a time, one thread each."""
    two_at_a_time([["--name", long_name(trial), *BASE, "--grid", f"trainer.max_epochs={full_length(trial, epochs)}",
                    "--seeds", "0", "--workers", "1", "--", *FAST, *values(trial), "--test_after_fit", "false"]
                   for trial in finalist_trials])


def long_rows(finalist_trials: list[dict]) -> list[dict]:
    rows = []
    for trial in finalist_trials:
        for row in csv.DictReader((ROOT / long_name(trial) / "results.csv").open()):
            rows.append({"trial": trial["trial"], "proxy": float(trial["val/acc_best"]),
                         "widths": f"{trial['model.net.init_args.hidden1']}-{trial['model.net.init_args.hidden2']}",
                         "epochs": int(row["trainer.max_epochs"]), "val": float(row["val/acc_best"]),
                         "wall_s": float(row["wall_s"])})
    return rows


def draw_curves(finalist_trials: list[dict], path: Path) -> None:
    """val/acc of every epoch of each full-length run (its TensorBoard events) against the epoch's share of the
    run: where each curve still climbs when its cosine ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figure, axes = plt.subplots(figsize=(7, 4))
    for trial in finalist_trials:
        for run in sorted((ROOT / long_name(trial)).glob("*/seed0/")):
            events = EventAccumulator(str(run))
            events.Reload()
            points = events.Scalars("val/acc")
            axes.plot([(p.step + 1) / len(points) for p in points], [p.value for p in points], alpha=0.8,
                      label=f"proxy trial {trial['trial']} at {len(points)} epochs")
    axes.set(xlabel="share of the run's epochs (the cosine ends at 1)", ylabel="val/acc", ylim=(0.985, 0.997))
    axes.axhline(0.995, color="grey", linewidth=0.5)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_docs(finalist_trials: list[dict]) -> None:
    count, span = counts("mlp995-proxy")
    long = long_rows(finalist_trials)
    chosen = max(long, key=lambda row: (row["val"], row["proxy"]))  # a tie on val goes to the better proxy
    rows = ["| stage | what ran | figures |", "|---|---|---|",
            f"| 1. proxies | `{SPACE}`, {PROXY_EPOCHS} epochs, median pruning, 2 workers | "
            f"{count}; {int(span) / 60:.1f} min, first start to last end |"]
    for row in long:
        rows.append(f"| 2. full length | proxy trial {row['trial']} (proxy val {row['proxy']:.4f}), {row['widths']}, "
                    f"{row['epochs']} epochs, 1 thread, two runs at a time | val/acc_best {row['val']:.4f}, "
                    f"{row['wall_s']:.0f} s{' (chosen: mlp_995.yaml)' if row is chosen else ''} |")
    records = json.loads(RECORDS.read_text())
    if "99.5" in records["recipes"]:
        runs = records["recipes"]["99.5"]
        tests = [r["test_acc"] for r in runs]
        walls = [r["wall_s"] for r in runs]
        rows.append(f"| 3. retrained | `configs/experiment/mlp_995.yaml`, seeds "
                    f"{' '.join(str(r['seed']) for r in runs)}, 2 threads, one at a time | t10k mean "
                    f"{sum(tests) / len(tests):.4f} ({', '.join(f'{t:.4f}' for t in tests)}), "
                    f"{min(walls):.0f}-{max(walls):.0f} s launch to result (README, \"Time to accuracy\") |")
    top = header("figures/search_995.py", "real MNIST, `python scripts/figures/search_995.py`")
    details = ["\n".join(rows), "", "### Stage 1, `logs/search/mlp995-proxy/top.md`", "",
               (ROOT / "mlp995-proxy" / "top.md").read_text(),
               "![val/acc of each full-length run against its share of the epochs](search-995-curves.png)", ""]
    replace_block(DOC, "figures/search_995.py", [top, *details])
    draw_curves(finalist_trials, REPO / "docs" / "search-995-curves.png")
    print(json.dumps({"long": long, "chosen": chosen}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finalists", type=int, default=2, help="proxy trials run again at full length")
    parser.add_argument("--epochs", type=int, default=240,
                        help="the full length, in epochs of mlp_993.yaml's widths (scaled by each finalist's FLOPs)")
    parser.add_argument("--only-docs", action="store_true", help="rewrite the block; train nothing")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="the stages to run (1 2)")
    args = parser.parse_args()
    if not args.only_docs:
        if 1 in args.stages:
            search("--name", "mlp995-proxy", "--space", SPACE, "--trials", str(PROXY_TRIALS), "--workers", "2",
                   *BASE, "--", *FAST[:4], "--trainer.max_epochs", str(PROXY_EPOCHS), *FAST[4:])
        if 2 in args.stages:
            run_long(finalists(args.finalists), args.epochs)
    write_docs(finalists(args.finalists))


if __name__ == "__main__":
    main()
