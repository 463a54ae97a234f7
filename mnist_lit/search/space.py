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


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    sampler: dict
    pruner: dict | None

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
        unknown = set(text) - {"space", "sampler", "pruner"}
        if unknown:
            raise SearchSpaceError(f"--space {path}: unknown top-level keys {sorted(unknown)}; the file has "
                                   "'space', and optionally 'sampler' and 'pruner'.")
        dimensions = tuple(dimension(path, key, spec) for key, spec in text["space"].items())
        return cls(dimensions, class_spec(path, "sampler", text.get("sampler", DEFAULT_SAMPLER)),
                   class_spec(path, "pruner", text.get("pruner", DEFAULT_PRUNER)))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def first(self) -> dict[str, Any]:
        """One point of the space (every range's low end), to check the keys against the fit command."""
        return {d.key: d.first() for d in self.dimensions}

    def record(self) -> dict:
        """What the study keeps, so that every worker searches the same space."""
        return {d.key: {"type": d.kind, **d.options} for d in self.dimensions}


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
