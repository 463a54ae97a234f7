"""Time to accuracy: each recipe's t10k result and its seconds from launch to result, split into their parts, and
the picture of val/acc against seconds since launch, beside the published anchors.

    python scripts/measure/time_to_accuracy.py                 # every recipe, one fit at a time: ~50 min on 2 cores
    python scripts/measure/time_to_accuracy.py --only 99.0     # one recipe again; the others' records are kept
    python scripts/measure/time_to_accuracy.py --only-docs     # the block and the picture from the kept records

Each fit is ``python -m mnist_lit fit`` with the recipe's configs and a seed, on the whole machine (torch's default
threads, one per core), alone: run it with nothing else busy. The wall time is taken around the process, launch
to exit; the parts are the run's own metrics.json ``seconds`` (``mnist_lit/clock.py``). The records land in
docs/time-to-accuracy.json; the README's block and docs/time-to-accuracy.png are written from them.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "figures"))
from generated_block import cpu_model, header, replace_block  # noqa: E402

RECORDS = REPO / "docs" / "time-to-accuracy.json"
PICTURE = REPO / "docs" / "time-to-accuracy.png"
SCRIPT = "measure/time_to_accuracy.py"
DEFAULT = "configs/default.yaml"
# label -> (config files after default.yaml, seeds): the README's recipes, fastest first.
RECIPES = {
    "99.0": (["configs/experiment/mlp_990_fast.yaml"], [0, 1, 2]),
    "default": ([], [0, 1, 2]),
    "mlp_990": (["configs/experiment/mlp_990.yaml"], [0]),
    "mlp_993": (["configs/experiment/mlp_993.yaml"], [0]),
    "99.5": (["configs/experiment/mlp_995.yaml"], [0, 1, 2]),
}
# Published results beside ours: (who, what, error, time), as each paper or repository reports them.
ANCHORS = [
    ("Cireşan et al. 2010", "MLP 1000-500, elastic + affine, GTX 280", "0.49 %", "about a day"),
    ("Simard et al. 2003", "MLP 800, elastic distortions", "0.7 %", "not reported"),
    ("Srivastava et al. 2014", "MLP 2 x 8192, dropout + max-norm", "0.95 %", "not reported"),
    ("gnawice/mojo-cnn", "CNN, 8 CPU threads", "1.00 % (epoch 4)", "about 28 s"),
    ("tuomaso/train_mnist_fast", "small CNN, GTX 1660 Ti", "0.96 %", "0.76 s"),
]


def fit(configs: list[str], seed: int, logs: Path) -> dict:
    command = [sys.executable, "-m", "mnist_lit", "fit", "--config", DEFAULT,
               *(part for config in configs for part in ("--config", config)), "--seed_everything", str(seed),
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs)]
    print("+", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"time_to_accuracy: the fit failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (metrics_file,) = logs.glob("*/version_*/metrics.json")
    record = json.loads(metrics_file.read_text())
    metrics_file.rename(metrics_file.with_name(f"metrics-seed{seed}.json"))  # the next fit's folder is found alone
    result = {"seed": seed, "wall_s": round(wall, 2), "test_acc": record["metrics"]["test/acc"],
              "val_acc_best": record["metrics"]["val/acc_best"], "epochs": record["epochs"],
              "seconds": record["seconds"], "curve": record["val_acc_by_seconds"]}
    print(f"  test/acc {result['test_acc']:.4f}, {wall:.1f} s launch to exit, parts {record['seconds']}", flush=True)
    return result


def mean_std(values: list[float], digits: int) -> str:
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def block(records: dict) -> list[str]:
    lines = [header(SCRIPT, f"real MNIST, torch's default threads (one per core), one fit at a time, "
                            f"`python scripts/{SCRIPT}`"),
             "| recipe | t10k test accuracy (seeds) | launch to result | start-up | train | validation | test "
             "| the rest |", "|---|---|---|---|---|---|---|---|"]
    for label, runs in records["recipes"].items():
        configs = RECIPES[label][0]
        name = " + ".join(f"`{Path(c).name}`" for c in configs) or "`default.yaml`"
        accuracies = [r["test_acc"] for r in runs]
        parts = {part: mean_std([r["seconds"][part] for r in runs], 1)
                 for part in ("start_up", "train", "validation", "test", "other")}
        lines.append(f"| {name} | **{mean_std(accuracies, 4)}** ({', '.join(f'{a:.4f}' for a in accuracies)}) | "
                     f"**{mean_std([r['wall_s'] for r in runs], 1)} s** | {parts['start_up']} s | {parts['train']} s "
                     f"| {parts['validation']} s | {parts['test']} s | {parts['other']} s |")
    return lines


def picture(records: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axes, notes) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, (label, runs) in enumerate(records["recipes"].items()):
        run = runs[0]
        times, accuracies = zip(*run["curve"], strict=True)
        name = " + ".join(Path(c).stem for c in RECIPES[label][0]) or "default"
        axes.plot(times, accuracies, "-", color=f"C{i}", lw=1.4, label=f"{name} (val/acc, seed {run['seed']})")
        axes.plot([run["wall_s"]], [run["test_acc"]], "*", color=f"C{i}", ms=11)
    axes.plot([], [], "*", color="0.3", ms=11, label="t10k test accuracy at the result")
    for level in (0.99, 0.995):
        axes.axhline(level, color="0.7", lw=0.7, ls="--")
    axes.set_xscale("log")
    axes.set_ylim(0.975, 0.997)
    axes.set_xlabel("seconds since launch (log scale)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Two hidden layers, {records['cpu']}, 2 threads")
    axes.legend(loc="lower right", fontsize=8)
    notes.axis("off")
    text = "Published, for comparison:\n\n" + "\n\n".join(f"{who}\n  {what}\n  error {error}, {took}"
                                                        for who, what, error, took in ANCHORS)
    notes.text(0, 1, text, va="top", fontsize=8.5, family="monospace")
    figure.savefig(PICTURE, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(RECIPES), help="run these recipes again (repeat)")
    parser.add_argument("--only-docs", action="store_true", help="write the block and the picture, run nothing")
    options = parser.parse_args()
    records = json.loads(RECORDS.read_text()) if RECORDS.is_file() else {"recipes": {}}
    if not options.only_docs:
        for label in options.only or list(RECIPES):
            configs, seeds = RECIPES[label]
            with tempfile.TemporaryDirectory() as logs:
                records["recipes"][label] = [fit(configs, seed, Path(logs)) for seed in seeds]
            records["cpu"] = cpu_model()
            records["recipes"] = {k: records["recipes"][k] for k in RECIPES if k in records["recipes"]}
            RECORDS.write_text(json.dumps(records, indent=1) + "\n")
    print(replace_block(REPO / "README.md", SCRIPT, block(records)))
    picture(records)
    print(f"Picture: {PICTURE}")


if __name__ == "__main__":
    main()
