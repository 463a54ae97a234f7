"""What a search or a grid leaves in its folder, read from the study's storage (so a worker on any machine
writes the same tables): a grid's results.md / results.csv, a search's top.md, trials.csv, best.yaml and
its plots."""

from __future__ import annotations

import csv
import statistics
import sys
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_lit.search import fork
from mnist_lit.search.study import DONE, Plan, runs_of

METRICS = ("test/acc", "val/acc_best", "test/loss")  # a grid's summary per configuration, with the wall time
TOP = 10


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def latest(trials: list[FrozenTrial]) -> FrozenTrial:
    done = [t for t in trials if t.state in DONE]
    return (done or sorted(trials, key=lambda t: t.number))[-1]


def write_grid_results(study: optuna.Study, plan: Plan) -> bool:
    """results.csv (a row per run) and results.md (mean ± std per configuration); True when every run is done."""
    runs = runs_of(study.get_trials(deepcopy=False))
    records = []
    for run, params in plan.grid_runs():
        row = {"configuration": run.split("/")[0], **{k: params[k] for k in plan.grid},
               "seed": params["seed_everything"]}
        trial = latest(runs[run]) if run in runs else None
        if trial is None or trial.state not in DONE:
            status = {TrialState.FAIL: "failed", TrialState.RUNNING: "running"}.get(trial and trial.state, "not run")
            records.append(row | {"status": status, "run_folder": str(plan.folder / run)})
            continue
        metrics = trial.user_attrs["metrics"]
        records.append(row | {"status": "ok", **{m: metrics.get(m) for m in METRICS},
                              "wall_s": trial.user_attrs.get("wall_s"), "run_folder": str(plan.folder / run)})
    write_csv(plan.folder / "results.csv", records)
    table = summarize(records, list(plan.grid))
    (plan.folder / "results.md").write_text(table)
    print(f"\n{table}\nAll runs: {plan.folder / 'results.csv'}")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} runs did not finish; their console logs are seed<S>.log beside their folders. Run the "
              "same command again to retry them.", file=sys.stderr)
    return not failed


def summarize(records: list[dict], keys: list[str]) -> str:
    """Markdown: one row per configuration, mean ± std (sample std over seeds) of each metric."""
    header = ["configuration", *keys, "seeds", *METRICS, "wall_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["configuration"], []).append(record)
    for name, group in groups.items():
        done = [r for r in group if r["status"] == "ok"]
        cells = [name, *(str(group[0].get(k, "")) for k in keys), f"{len(done)}/{len(group)}"]
        for metric in (*METRICS, "wall_s"):
            values = [r[metric] for r in done if r.get(metric) is not None]
            if not values:
                cells.append("–")
                continue
            digits = 1 if metric == "wall_s" else 4
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.{digits}f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_search_results(study: optuna.Study, plan: Plan) -> bool:
    """trials.csv, top.md, best.yaml and the plots; True when the study has its trials."""
    trials = study.get_trials(deepcopy=False)
    keys = [d.key for d in plan.space.dimensions]
    resumed_by = {t.user_attrs["resumes"]: t.number for t in trials if "resumes" in t.user_attrs}
    interrupted = {t.number for t in trials
                   if t.state == TrialState.FAIL and not {"error", "skipped"} & t.user_attrs.keys()}

    def note(t: FrozenTrial) -> str:
        if t.number in interrupted:
            return f"interrupted; resumed by trial {resumed_by[t.number]}" if t.number in resumed_by else \
                "interrupted; not resumed (the study had its trials)"
        return t.user_attrs.get("error") or (f"skipped: {t.user_attrs['skipped']}" if "skipped" in t.user_attrs
                                             else "")

    timed = plan.space.timed  # a Pareto front of val/acc_best against seconds
    rows = [{"trial": t.number, "state": t.state.name, "val/acc_best": t.values[0] if t.values else None,
             **({"seconds": t.values[1] if t.values else None} if timed else {}), **t.params,
             "epochs": t.user_attrs.get("epochs"), "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
             "wall_s": t.user_attrs.get("wall_s"), "run_folder": t.user_attrs.get("run_folder"),
             "note": note(t)} for t in trials]
    write_csv(plan.folder / "trials.csv", rows)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.values[0])
    if timed:
        ranked = sorted(pareto_front(ranked), key=lambda t: t.values[1])
    header = ["trial", "val/acc_best", *(["seconds"] if timed else []), *(k.rsplit(".", 1)[-1] for k in keys),
              "epochs", "wall_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in ranked if timed else ranked[:TOP]:
        cells = [t.number, f"{t.values[0]:.4f}", *([f"{t.values[1]:.1f}"] if timed else []),
                 *(cell(t.params[k]) for k in keys), t.user_attrs.get("epochs"), t.user_attrs.get("wall_s")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    ended = [t for t in trials if t.datetime_complete is not None and t.datetime_start is not None]
    span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds() \
        if ended else 0.0
    summary = (f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
               f"{counts[TrialState.FAIL]} failed ({len(interrupted)} of them interrupted, "
               f"{len(interrupted & resumed_by.keys())} resumed; trials.csv says which), "
               f"{counts[TrialState.RUNNING]} running. Wall time from the first "
               f"trial's start to the last one's end: {span:.0f} s; the trials' own, added up: "
               f"{sum(t.user_attrs.get('wall_s', 0) for t in trials):.0f} s.")
    if timed:
        best, why = chosen(ranked, plan.space.target)
        title = (f"The Pareto front of study '{plan.name}': no other trial is both more accurate and faster "
                 f"(val/acc_best against the fit's launch-to-result seconds; the test set is not looked at), "
                 f"fastest first. best.yaml: {why}.")
    else:
        best = ranked[0] if ranked else None
        title = f"Top {TOP} of study '{plan.name}' by val/acc_best (the test set is not looked at):"
    top = f"{title}\n\n" + "\n".join(lines) + f"\n\n{summary}\n"
    (plan.folder / "top.md").write_text(top)
    print(f"\n{top}All trials: {plan.folder / 'trials.csv'}")
    if best is not None:
        write_best_config(plan, best)
        if timed:
            write_front_plot(trials, ranked, plan)
        else:
            write_plots(study, plan.folder)
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= plan.trials


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that no other beats on both objectives (at least as accurate and as fast, better on one)."""
    def beats(a: FrozenTrial, b: FrozenTrial) -> bool:
        return a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values != b.values
    return [t for t in trials if not any(beats(other, t) for other in trials)]


def chosen(front: list[FrozenTrial], target: float | None) -> tuple[FrozenTrial | None, str]:
    """best.yaml's trial from the front (fastest first): the fastest that reaches the target, else the most
    accurate, and why."""
    if not front:
        return None, "none yet"
    reaching = [t for t in front if target is not None and t.values[0] >= target]
    if reaching:
        return reaching[0], f"trial {reaching[0].number}, the fastest with val/acc_best >= {target}"
    best = max(front, key=lambda t: t.values[0])
    return best, (f"trial {best.number}, the most accurate (no trial reached the target {target})" if target
                  else f"trial {best.number}, the most accurate (the space names no target)")


def write_front_plot(trials: list[FrozenTrial], front: list[FrozenTrial], plan: Plan) -> None:
    """front.png: every complete trial's val/acc_best against its seconds, the front joined, the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=14, color="0.6", label="trials")
    axes.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", color="C0", label="Pareto front")
    for t in front:
        axes.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    if plan.space.target is not None:
        axes.axhline(plan.space.target, color="C3", lw=0.8, ls="--", label=f"target {plan.space.target}")
    axes.set_xlabel("seconds from launch to result (the trial's fit)")
    axes.set_ylabel("val/acc_best")
    axes.set_title(f"study '{plan.name}': accuracy against time")
    axes.legend(loc="lower right")
    figure.savefig(plan.folder / "front.png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best_config(plan: Plan, best: FrozenTrial) -> None:
    """best.yaml: the base configs, the arguments after -- and the best trial's values, resolved by the fit
    command itself, so that ``fit --config best.yaml`` runs as is."""
    done = fork.run(["fit", *plan.base_arguments(best.params), "--print_config"])
    if done.returncode == 0:
        timing = f", {best.values[1]:.1f} s launch to result" if len(best.values) > 1 else ""
        header = f"# Trial {best.number} of study '{plan.name}', val/acc_best {best.values[0]:.4f}{timing}. " \
                 "Retrain over seeds:\n" \
                 f"#   python -m mnist_lit.search --name {plan.name}-best --config {plan.folder / 'best.yaml'} " \
                 "--seeds 0 1 2\n"
        (plan.folder / "best.yaml").write_text(header + done.stdout)
        print(f"Best configuration: {plan.folder / 'best.yaml'} (trial {best.number})")
    else:
        print(f"best.yaml could not be written: {done.stderr.strip()[-500:]}", file=sys.stderr)


def write_plots(study: optuna.Study, folder: Path) -> None:
    """Optuna's own figures: the optimization history, and the parameter importances (fANOVA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for name, plot in (("history.png", plot_optimization_history), ("importances.png", plot_param_importances)):
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:  # importances need two complete trials that differ
                print(f"{name} not drawn: {err}", file=sys.stderr)
                continue
            axes.figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
