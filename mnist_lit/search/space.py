"""A search space file: the fit command's dotted keys, each with an Optuna range; optionally the sampler and
the pruner, as class_path + init_args.

    sampler: {class_path: optuna.samplers.TPESampler, init_args: {seed: 0, constant_liar: true}}
    pruner: {class_path: optuna.pruners.MedianPruner, init_args: {n_startup_trials: 5, n_warmup_steps: 1}}
    space:
      model.optimizer.init_args.lr: {type: float, low: 0.01, high: 0.5, log: true}   # log-uniform
      model.optimizer.init_args.momentum: {type: float, low: 0.8, high: 0.99}      # uniform
      model.net.init_args.hidden1: {type: int, low: 128, high: 1024, log: true}
      data.batch_size: {type: categorical, choices: [64, 128, 256]}

Each range is handed to ``trial.suggest_float / suggest_int / suggest_categorical`` as written.

A search for time (configs/search/mlp_990_time.yaml) names two objectives, and may name a target:

    objectives: [val/acc_best, seconds]   # maximize the one, minimize the other: a Pareto front
    target: 0.99                          # best.yaml: the fastest trial on the front with val/acc_best >= 0.99

``seconds`` is the trial's own launch-to-result time, from its metrics.json (``mnist_lit.clock``). Optuna's
pruners do not apply to a study of two objectives: none is used, and a ``pruner`` given with them is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

DEFAULT_SAMPLER = {"class_path": "optuna.samplers.TPESampler", "init_args": {"constant_liar": True}}
DEFAULT_PRUNER = {"class_path": "optuna.pruners.MedianPruner", "init_args": {"n_startup_trials": 5,
                                                                             "n_warmup_steps": 1}}
RANGE_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
              "categorical": {"choices"}}


class SearchSpaceError(ValueError):
    """A search space file that cannot be searched; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Dimension:
    key: str  # the fit command's dotted name, e.g. model.optimizer.init_args.lr
    kind: str  # float / int / categorical
    options: dict  # low, high, log, step; or choices

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.options["choices"])
        suggest = trial.suggest_float if self.kind == "float" else trial.suggest_int
        return suggest(self.key, **self.options)

    def first(self) -> Any:
        return self.options["choices"][0] if self.kind == "categorical" else self.options["low"]


def as_argument(key: str, value: Any) -> list[str]:
    """``--key value`` for the fit command; the value in YAML/JSON form, as the CLI parses it."""
    return [f"--{key}", value if isinstance(value, str) else json.dumps(value)]


OBJECTIVES = {"val/acc_best": "maximize", "seconds": "minimize"}  # what a trial's metrics.json gives


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    sampler: dict
    pruner: dict | None
    objectives: tuple[str, ...] = ("val/acc_best",)
    target: float | None = None

    @property
    def timed(self) -> bool:
        """A search for time: the Pareto front of val/acc_best against seconds."""
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        try:
            text = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise SearchSpaceError(f"--space {path} cannot be read: {err}. Give a YAML file like "
                                   "configs/search/mlp.yaml.") from None
        if not isinstance(text, dict) or not isinstance(text.get("space"), dict) or not text["space"]:
            raise SearchSpaceError(f"--space {path} has no 'space:' mapping of dotted keys to ranges; see "
                                   "configs/search/mlp.yaml.")
        unknown = set(text) - {"space", "sampler", "pruner", "objectives", "target"}
        if unknown:
            raise SearchSpaceError(f"--space {path}: unknown top-level keys {sorted(unknown)}; the file has "
                                   "'space', and optionally 'sampler', 'pruner', 'objectives' and 'target'.")
        dimensions = tuple(dimension(path, key, spec) for key, spec in text["space"].items())
        objectives, target = objectives_of(path, text)
        if len(objectives) > 1 and text.get("pruner") is not None:
            raise SearchSpaceError(f"--space {path} has two objectives ({', '.join(objectives)}) and a pruner: "
                                   "Optuna's pruners judge one value per epoch, so they do not apply to a study of "
                                   "two. Drop 'pruner' (a time search ranges over trainer.max_epochs instead, so a "
                                   "short run is a cheap trial of its own), or search one objective.")
        pruner = None if len(objectives) > 1 else class_spec(path, "pruner", text.get("pruner", DEFAULT_PRUNER))
        return cls(dimensions, class_spec(path, "sampler", text.get("sampler", DEFAULT_SAMPLER)), pruner,
                   objectives, target)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def first(self) -> dict[str, Any]:
        """One point of the space (every range's low end), to check the keys against the fit command."""
        return {d.key: d.first() for d in self.dimensions}

    def record(self) -> dict:
        """What the study keeps, so that every worker searches the same space."""
        return {d.key: {"type": d.kind, **d.options} for d in self.dimensions}


def objectives_of(path, text: dict) -> tuple[tuple[str, ...], float | None]:
    objectives, target = text.get("objectives", ["val/acc_best"]), text.get("target")
    if not isinstance(objectives, list) or not objectives or objectives[0] != "val/acc_best" \
            or not set(objectives) <= set(OBJECTIVES) or len(set(objectives)) != len(objectives):
        raise SearchSpaceError(f"--space {path}: 'objectives' is {objectives!r}; give [val/acc_best] (the default) "
                               "or [val/acc_best, seconds] (a Pareto front of accuracy against launch-to-result "
                               "seconds).")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0 < target <= 1 or len(objectives) == 1):
        raise SearchSpaceError(f"--space {path}: 'target' is {target!r}; it is a val/acc_best between 0 and 1, for "
                               "a search with objectives [val/acc_best, seconds] (best.yaml: the fastest trial "
                               "that reaches it).")
    return tuple(objectives), None if target is None else float(target)


def dimension(path, key: str, spec) -> Dimension:
    where = f"--space {path}: {key}"
    if not isinstance(spec, dict) or spec.get("type") not in RANGE_KEYS:
        raise SearchSpaceError(f"{where} must be a mapping with 'type' float, int or categorical, e.g. "
                               "{type: float, low: 0.01, high: 0.5, log: true}.")
    kind, options = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    extra = set(options) - RANGE_KEYS[kind]
    if extra:
        raise SearchSpaceError(f"{where}: {sorted(extra)} is not part of a {kind} range, which takes "
                               f"{sorted(RANGE_KEYS[kind])}.")
    if kind == "categorical":
        choices = options.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: 'choices' must be a non-empty list.")
        return Dimension(key, kind, {"choices": choices})
    low, high = options.get("low"), options.get("high")
    number = float if kind == "float" else int
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or \
            (kind == "int" and not all(isinstance(v, int) for v in (low, high))):
        raise SearchSpaceError(f"{where}: 'low' and 'high' must both be {kind}s (got {low!r}, {high!r}).")
    if low > high:
        raise SearchSpaceError(f"{where}: the range [{low}, {high}] is empty; give low <= high.")
    if options.get("log") and low <= 0:
        raise SearchSpaceError(f"{where}: a log range must be above 0, and low is {low}; give a positive low "
                               "(e.g. 1e-6) or drop 'log'.")
    options = {**options, "low": number(low), "high": number(high)}
    try:  # Optuna's own checks of the rest (a step that does not fit, step with log, ...), before any trial
        (optuna.distributions.FloatDistribution if kind == "float" else optuna.distributions.IntDistribution)(
            **options)
    except (ValueError, TypeError) as err:
        raise SearchSpaceError(f"{where}: {err}") from None
    return Dimension(key, kind, options)


def class_spec(path, what: str, spec) -> dict | None:
    """A sampler or pruner as {class_path, init_args}, checked to exist and to accept its arguments."""
    if spec is None and what == "pruner":
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or \
            not isinstance(spec.get("init_args", {}), dict) or set(spec) - {"class_path", "init_args"}:
        raise SearchSpaceError(f"--space {path}: '{what}' must be {{class_path: ..., init_args: {{...}}}}, e.g. "
                               f"{DEFAULT_SAMPLER if what == 'sampler' else DEFAULT_PRUNER}.")
    try:
        instantiate(spec)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise SearchSpaceError(f"--space {path}: the {what} {spec['class_path']} cannot be made from its "
                               f"init_args: {err}.") from None
    return {"class_path": spec["class_path"], "init_args": spec.get("init_args", {})}


def instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)(**spec.get("init_args", {}))
