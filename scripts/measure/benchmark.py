"""Training speed side by side: mnist_lit's fast path and its Lightning loop vs a plain PyTorch loop.

    python scripts/measure/benchmark.py                  # CPU: ~40 min on 2 cores; rewrites docs/benchmarks.md + .png
    python scripts/measure/benchmark.py --repeats 1 --no-docs --no-extras --textbook

Every variant is its own process (start-up counts), on the same data, model (784-512-256-10), SGD
settings and epochs: at batch 64, 128 and 512, each at 1 and 2 torch threads, the plain loop,
mnist_lit's fast path (the default: up to 1024 SGD steps per training_step call, about a second of them)
and mnist_lit on Lightning's own loop (steps_per_training_step 1), and a subclass that overrides only
the loss (label smoothing) beside the plain loop with the same loss; then mnist_lit and the plain loop
each at its own defaults (whole process, fit's test pass included). The variants of one repeat run back
to back (every other repeat in reverse order) so that ratios compare runs made under the same machine
conditions. Per variant it reports whole-process wall time, the training seconds of its fastest epoch
after the first (validation excluded), samples/s, time from launch to the first training step, peak RSS
and final val accuracy, then the ratios to the plain loop (min and median over repeats). Optionally the
textbook torchvision + DataLoader pipeline. Then: time to accuracy (the full default fit, then `test` on
the best checkpoint), and epoch time with 1 or 2 torch threads, alone and beside a busy process. On a
GPU machine it also runs bf16-mixed at batch 64, 512 and 4096.
"""

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "measure"
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
TRAIN_ROWS = 55_000


def prepare_data(source: Path, root: Path) -> Path:
    """Uncompressed IDX files under root/MNIST/raw (torchvision's MNIST class reads only those)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_NAMES:
        gz = next(p for p in (source / f"{name}.gz", source / "MNIST" / "raw" / f"{name}.gz") if p.exists())
        (raw / name).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


def run_process(argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one variant; wall time, peak RSS (this child and its own children) and exit status."""
    launched = time.time()
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark: {' '.join(argv)} failed; its output is in {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "launched_unix": launched, "peak_rss_mb": usage.ru_maxrss / 1024}


# (hidden1, hidden2, batch): the default network at three batch sizes; small batches are where per-step
# framework costs weigh most.
SETTINGS = {f"batch {batch}": (512, 256, batch) for batch in (64, 128, 512)}
THREADS = (1, 2)
# mnist_lit's two loops: the fast path (the default: up to 1024 SGD steps per training_step call, about a second
# of them) and Lightning's own automatic loop (one batch per call), which --model.steps_per_training_step 1 selects.
LOOPS = {"mnist_lit fast path": ("--model.steps_per_training_step", "1024"),
         "mnist_lit Lightning loop (1 step/call)": ("--model.steps_per_training_step", "1")}
# A subclass that overrides only the loss (label smoothing), on the fast path, beside the plain loop with that loss.
SUBCLASS, SMOOTHING = "mnist_lit loss subclass, fast path", "0.1"
TEXTBOOK_SETTINGS = ("batch 128",)
WHOLE_PROCESS_EPOCHS = 2  # the "defaults" pair: a short fit, where start-up and the test pass weigh most


def mnist_lit(data: Path, work: Path, setting: tuple, epochs: int, threads: int | None, *extra: str) -> dict:
    """None threads: the product's default (PyTorch's, one per core)."""
    h1, h2, batch = setting
    probe = work / "probe.json"
    argv = [sys.executable, "-m", "mnist_lit", "fit", "--config", "configs/default.yaml",
            "--data.data_dir", str(data), "--data.download", "false", "--data.batch_size", str(batch),
            "--model.net.init_args.hidden1", str(h1), "--model.net.init_args.hidden2", str(h2),
            "--trainer.max_epochs", str(epochs), *(("--torch_threads", str(threads)) if threads else ()),
            "--trainer.logger.init_args.save_dir", str(work / "logs"),
            "--trainer.callbacks+=bench_probe.BenchmarkProbe", *extra]
    result = run_process(argv, work / "log.txt", {"PYTHONPATH": str(SCRIPTS), "BENCHMARK_PROBE_OUT": str(probe)})
    return result | json.loads(probe.read_text())


def textbook(data: Path, work: Path, setting: tuple, epochs: int, threads: int, workers: int) -> dict:
    h1, h2, batch = setting
    probe = work / "probe.json"
    argv = [sys.executable, str(SCRIPTS / "textbook_pipeline.py"), "--data-dir", str(data), "--epochs", str(epochs),
            "--batch-size", str(batch), "--hidden", str(h1), str(h2), "--num-workers", str(workers),
            "--threads", str(threads), "--log-dir", str(work / "logs"), "--callback", "bench_probe.BenchmarkProbe"]
    result = run_process(argv, work / "log.txt", {"PYTHONPATH": f"{SCRIPTS}:{REPO}", "BENCHMARK_PROBE_OUT": str(probe)})
    return result | json.loads(probe.read_text())


def plain(data: Path, work: Path, setting: tuple, epochs: int, threads: int | None, *extra: str) -> dict:
    h1, h2, batch = setting
    argv = [sys.executable, str(SCRIPTS / "plain_loop.py"), "--data-dir", str(data), "--epochs", str(epochs),
            "--batch-size", str(batch), "--hidden", str(h1), str(h2), *(("--threads", str(threads)) if threads else ()),
            *extra]
    result = run_process(argv, work / "log.txt")
    lines = [json.loads(line) for line in (work / "log.txt").read_text().splitlines() if line.startswith("{")]
    epochs_ = [line for line in lines if "epoch" in line]
    return result | {"epoch_train_s": [e["train_s"] for e in epochs_], "val_acc": epochs_[-1]["val_acc"],
                     "first_step_unix": lines[-1]["first_step_unix"], "device": "plain loop"}


def summarize(raw: dict) -> dict:
    """Per-run figures: the fastest training epoch after the first (warm-up excluded). The fastest, because
    what a busy neighbour adds to an epoch only ever adds: the least-disturbed epoch is the closest to the cost."""
    epoch_s = min(raw["epoch_train_s"][1:] or raw["epoch_train_s"])
    return {"wall_s": raw["wall_s"], "epoch_s": epoch_s, "samples_per_s": TRAIN_ROWS / epoch_s,
            "first_step_s": raw["first_step_unix"] - raw["launched_unix"], "peak_rss_mb": raw["peak_rss_mb"],
            "val_acc": raw["val_acc"]}


def variants(args: argparse.Namespace, data: Path, gpu: bool) -> dict:
    e = args.epochs
    table = {}
    for name, setting in SETTINGS.items():
        for t in THREADS:
            table[f"plain loop, {name}, {t} thr"] = lambda w, s=setting, t=t: plain(data, w, s, e, t)
            for loop, flags in LOOPS.items():
                table[f"{loop}, {name}, {t} thr"] = lambda w, s=setting, t=t, f=flags: mnist_lit(data, w, s, e, t, *f)
            table[f"plain loop, label smoothing, {name}, {t} thr"] = (
                lambda w, s=setting, t=t: plain(data, w, s, e, t, "--label-smoothing", SMOOTHING))
            table[f"{SUBCLASS}, {name}, {t} thr"] = (
                lambda w, s=setting, t=t: mnist_lit(data, w, s, e, t, "--model", "bench_probe.LabelSmoothing",
                                                    "--model.smoothing", SMOOTHING))
    # Each at its own defaults (threads: PyTorch's), the whole process: start-up, 2 epochs, and fit's test pass.
    setting = SETTINGS["batch 128"]
    table["plain loop, defaults"] = lambda w: plain(data, w, setting, WHOLE_PROCESS_EPOCHS, None)
    table["mnist_lit fit, defaults"] = lambda w: mnist_lit(data, w, setting, WHOLE_PROCESS_EPOCHS, None)
    if args.textbook:
        for name in TEXTBOOK_SETTINGS:
            for workers in (0, 2):
                table[f"textbook Lightning ({workers} workers), {name}, 1 thr"] = (
                    lambda w, s=SETTINGS[name], n=workers: textbook(data, w, s, e, 1, n))
    if gpu:
        for batch in (64, 512, 4096):
            setting = (512, 256, batch)
            table[f"plain loop, 512-256, batch {batch}, GPU"] = lambda w, s=setting: plain(data, w, s, e, 1)
            table[f"mnist_lit fit bf16-mixed, 512-256, batch {batch}, GPU"] = (
                lambda w, s=setting: mnist_lit(data, w, s, e, 1, "--trainer.precision", "bf16-mixed"))
    return table


def ratios(runs: dict, key: str) -> dict:
    """Ratios within each repeat (same machine conditions), then min and median over repeats."""
    pairs = {"mnist_lit / plain loop, each at its defaults": ("mnist_lit fit, defaults", "plain loop, defaults")}
    for name in SETTINGS:
        for t in THREADS:
            for loop in LOOPS:
                pairs[f"{loop} / plain loop, {name}, {t} thr"] = (f"{loop}, {name}, {t} thr",
                                                                  f"plain loop, {name}, {t} thr")
            pairs[f"{SUBCLASS} / plain loop with its loss, {name}, {t} thr"] = (
                f"{SUBCLASS}, {name}, {t} thr", f"plain loop, label smoothing, {name}, {t} thr")
    for name in TEXTBOOK_SETTINGS:
        for workers in (0, 2):
            pairs[f"textbook ({workers} workers) / mnist_lit fast path, {name}, 1 thr"] = (
                f"textbook Lightning ({workers} workers), {name}, 1 thr",
                f"{next(iter(LOOPS))}, {name}, 1 thr")
    out = {}
    for name, (a, b) in pairs.items():
        if a in runs and b in runs:
            values = [ra[key] / rb[key] for ra, rb in zip(runs[a], runs[b], strict=True)]
            out[name] = (min(values), statistics.median(values))
    return out


def time_to_accuracy(source: Path, work: Path, threads: int) -> dict:
    """The README's path: full default fit, then test on the best checkpoint, each a new process."""
    data = prepare_data(source, work / "data")
    common = ["--config", "configs/default.yaml", "--data.data_dir", str(data), "--data.download", "false",
              "--torch_threads", str(threads), "--trainer.logger.init_args.save_dir", str(work / "logs")]
    fit = run_process([sys.executable, "-m", "mnist_lit", "fit", *common], work / "fit.txt")
    (best,) = (work / "logs").glob("mnist/version_0/checkpoints/best-*.ckpt")
    test = run_process([sys.executable, "-m", "mnist_lit", "test", *common, "--ckpt_path", str(best)],
                       work / "test.txt")
    acc = next(float(line.split()[-1]) for line in (work / "test.txt").read_text().splitlines()
               if line.strip().startswith("test/acc"))
    return {"fit_s": fit["wall_s"], "test_s": test["wall_s"], "test_acc": acc, "best_checkpoint": best.name}


def contention(data: Path, work: Path, epochs: int) -> dict:
    """Epoch time with 1 or 2 torch threads, alone and while another process keeps one core busy."""
    out = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for threads in (1, 2):
                (work / f"{busy}{threads}").mkdir()
                setting = SETTINGS["batch 128"]
                result = summarize(mnist_lit(data, work / f"{busy}{threads}", setting, epochs, threads))
                out[f"{threads} thread{'s' * (threads > 1)}, {'beside a busy process' if busy else 'alone'}"] = (
                    result["epoch_s"])
        finally:
            if hog:
                hog.kill()
    return out


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} with `{report['command']}` "
             f"({report['repeats']} repeats; {report['epochs']} epochs a run, {WHOLE_PROCESS_EPOCHS} for the "
             "defaults pair; 'N thr': N torch threads).", "",
             "| variant | wall s | train s/epoch | spread | samples/s | first step s | peak RSS MB | val acc |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in report["runs"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        epochs = [r["epoch_s"] for r in runs]
        lines.append(f"| {name} | {med['wall_s']:.1f} | {med['epoch_s']:.2f} | {max(epochs) / min(epochs):.2f} | "
                     f"{med['samples_per_s']:,.0f} | {med['first_step_s']:.1f} | {med['peak_rss_mb']:.0f} | "
                     f"{med['val_acc']:.4f} |")
    lines += ["", "Medians over repeats; spread: the slowest repeat's train s/epoch over the fastest's, the same "
                  "command on this machine. Ratios, each from runs made side by side (min / median):", "",
              "| ratio | train s/epoch | whole-process wall | peak RSS |", "|---|---|---|---|"]
    for name in report["ratios"]["epoch_s"]:
        cells = [f"{report['ratios'][k][name][0]:.2f} / {report['ratios'][k][name][1]:.2f}"
                 for k in ("epoch_s", "wall_s", "peak_rss_mb")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if report.get("time_to_accuracy"):
        t = report["time_to_accuracy"]
        lines += ["", f"Time to accuracy (default config, 10 epochs): `fit` {t['fit_s']:.1f} s + `test` "
                      f"{t['test_s']:.1f} s = {t['fit_s'] + t['test_s']:.1f} s from launch to a t10k test "
                      f"accuracy of {t['test_acc']:.4f} ({t['best_checkpoint']})."]
    if report.get("contention"):
        lines += ["", "Training s/epoch (batch 128) by torch thread count:", "", "| threads | s/epoch |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["contention"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    epoch_s = [statistics.median(r["epoch_s"] for r in report["runs"][n]) for n in names]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.6))
    colors = ["#4c72b0" if "mnist_lit" in n else "#999999" for n in names[::-1]]
    bars = ax.barh(names[::-1], epoch_s[::-1], color=colors)
    ax.bar_label(bars, fmt="%.2f s", padding=3)
    ax.set_xlabel("training seconds per epoch (55,000 samples), median over repeats; lower is better")
    ax.set_title(f"MNIST MLP 512-256 + SGD\n{report['machine']}", fontsize=9)
    ax.set_xlim(0, max(epoch_s) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_docs(report: dict, docs: Path, kind: str) -> None:
    """Replace this kind's (cpu/gpu) generated block of docs/benchmarks.md; text around it stays."""
    begin, end = f"<!-- benchmark:{kind}:begin -->", f"<!-- benchmark:{kind}:end -->"
    page = docs / "benchmarks.md"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    figure = f"![training time per epoch, {kind}](benchmark-{kind}.png)"
    page.write_text(f"{head}{begin}\n{markdown(report)}\n\n{figure}\n{end}{tail}")
    plot(report, docs / f"benchmark-{kind}.png")
    (docs / f"benchmark-{kind}.json").write_text(json.dumps(report, indent=1))


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()}-core {cpu}, no GPU (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist",
                        help="folder with the four MNIST *-ubyte.gz files (or with MNIST/raw/ holding them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4,
                        help="per variant; its s/epoch is its fastest epoch after the first. The defaults pair: 2")
    parser.add_argument("--threads", type=int, default=1, help="for time to accuracy and the GPU runs")
    parser.add_argument("--textbook", action="store_true", help="also the textbook torchvision + DataLoader pipeline")
    parser.add_argument("--no-extras", action="store_true", help="skip time to accuracy and thread contention")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="mnist_lit_bench_"))
    try:
        data = prepare_data(args.mnist, work / "data")
        table = variants(args, data, gpu)
        runs: dict[str, list[dict]] = {name: [] for name in table}
        for repeat in range(args.repeats):
            # Every other repeat in reverse order: a machine that slows down or speeds up over the run does not
            # always favour the variant that runs first.
            for name, run in list(table.items())[:: -1 if repeat % 2 else 1]:
                run_dir = work / f"{repeat}-{len(runs[name])}-{abs(hash(name))}"
                run_dir.mkdir()
                runs[name].append(summarize(run(run_dir)))
                print(f"[{repeat + 1}/{args.repeats}] {name}: {json.dumps(runs[name][-1])}", flush=True)
        report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": args.repeats,
                  "epochs": args.epochs, "threads": args.threads,
                  "command": "python scripts/measure/benchmark.py " + " ".join(sys.argv[1:]), "runs": runs,
                  "ratios": {k: ratios(runs, k) for k in ("epoch_s", "wall_s", "peak_rss_mb")}}
        if not args.no_extras:
            report["time_to_accuracy"] = time_to_accuracy(args.mnist, work / "tta", args.threads)
            (work / "threads").mkdir()
            report["contention"] = contention(data, work / "threads", args.epochs)
        print(markdown(report))
        if not args.no_docs:
            write_docs(report, REPO / "docs", "gpu" if gpu else "cpu")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
