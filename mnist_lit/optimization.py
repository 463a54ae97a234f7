"""Optimizer and learning-rate schedule by config: any ``torch.optim`` class (or your own), with the run's
length filled in for the schedules that need it.

    python -m mnist_lit fit --config configs/default.yaml --config configs/experiment/adamw.yaml
    python -m mnist_lit fit --config configs/default.yaml --model.optimizer.init_args.lr 0.05
    python -m mnist_lit fit --config configs/default.yaml --model.lr_scheduler torch.optim.lr_scheduler.OneCycleLR \
        --model.lr_scheduler.max_lr 0.2

``model.optimizer`` and ``model.lr_scheduler`` take a ``class_path`` and its ``init_args`` without the
first argument (the parameters, the optimizer), LightningCLI's dependency injection. A schedule's length
argument, ``T_max`` (cosine) or ``total_steps`` (one-cycle, ``WarmupCosine``), is not set in the config:
``build_schedule`` gives it the run's length in the schedule's unit (SGD steps, or epochs), from the Trainer.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Protocol

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

RUN_LENGTH = ("T_max", "total_steps")  # the schedules' names for "how long the run is"


class OptimizerFactory(Protocol):
    """A ``torch.optim`` optimizer's class with its settings: given the parameters, the optimizer."""

    def __call__(self, params, /) -> Optimizer: ...


class ScheduleFactory(Protocol):
    """An lr schedule's class with its settings: given the optimizer, the schedule. ``T_max`` and
    ``total_steps`` are keyword-only here, so the config leaves them out and the Trainer fills them in."""

    def __call__(self, optimizer: Optimizer, /, *, T_max: int, total_steps: int) -> LRScheduler: ...


class OptimizationError(ValueError):
    """An optimizer or schedule that cannot be built for this run; the message names the key and the fix."""


class WarmupCosine(SequentialLR):
    """Linear warm-up from ``start_factor`` x lr to lr over ``warmup_steps``, then cosine to ``eta_min``
    over the rest of the run (``total_steps``: filled in from the Trainer).

    Args:
        optimizer: the optimizer whose lr it sets.
        warmup_steps: length of the linear warm-up, in the schedule's steps.
        total_steps: the whole run, warm-up included.
        start_factor: the first step's fraction of the lr.
        eta_min: the lr at the end of the run.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int = 1000,
                 start_factor: float = 0.01, eta_min: float = 0.0):
        if not 0 < warmup_steps < total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be between 1 and the run's length ({total_steps} "
                             "steps) minus one")
        warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min)
        super().__init__(optimizer, [warmup, cosine], milestones=[warmup_steps])


def built_class(factory) -> type | None:
    """The class a factory builds: the class itself, or the one in jsonargparse's partial of it."""
    if inspect.isclass(factory):
        return factory
    if isinstance(factory, functools.partial):
        return next((a for a in (factory.func, *factory.args) if inspect.isclass(a)), None)
    return None


def build_optimizer(factory: OptimizerFactory | None, params) -> Optimizer:
    """``factory(params)``; None: SGD with lr 0.1, momentum 0.9 and Nesterov, the tested default."""
    if factory is None:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    try:
        return factory(params)
    except (TypeError, ValueError) as err:
        name = getattr(built_class(factory), "__name__", factory)
        raise OptimizationError(f"--model.optimizer ({name}) cannot be built: {err}. Fix its init_args in the config "
                                "(python -m mnist_lit fit --model.optimizer.help CLASS lists them).") from None


def build_schedule(factory: ScheduleFactory, optimizer: Optimizer, steps: float, epochs: float,
                   interval: str) -> LRScheduler:
    """``factory(optimizer)``, with ``T_max`` / ``total_steps`` set to the run's length when the class takes one:
    ``steps`` SGD steps when it is stepped per step, else ``epochs``."""
    cls = built_class(factory)
    name = getattr(cls, "__name__", str(factory))
    given = factory.keywords if isinstance(factory, functools.partial) else {}
    wanted = [p for p in RUN_LENGTH if cls is not None and p in inspect.signature(cls).parameters and p not in given]
    length = steps if interval == "step" else epochs
    if wanted and not math.isfinite(length):
        raise OptimizationError(f"--model.lr_scheduler ({name}) needs the run's length, and this run has none: set "
                                "--trainer.max_epochs or --trainer.max_steps, or choose a schedule without a length "
                                "(--model.lr_scheduler null keeps the lr constant).")
    try:
        return factory(optimizer, **{p: int(length) for p in wanted})
    except (TypeError, ValueError) as err:
        raise OptimizationError(f"--model.lr_scheduler ({name}) cannot be built for this run: {err}. Fix its "
                                "init_args in the config.") from None


def extend_schedule(scheduler: LRScheduler, optimizer: Optimizer, length: float, finished: str) -> LRScheduler:
    """A resumed fit's schedule, fitted to the run's new ``length`` (the same unit as the schedule's steps).

    A cosine still under way is re-planned to the new length, continuous at the join (its next steps
    follow the cosine of the whole new run, scaled to the lr it had reached). A schedule that already
    ended (its lr at the floor) is refused, or with ``finished == "restart"`` replaced by a fresh one
    from the optimizer's initial lr over the added steps (a warm restart). Other schedules whose length
    changed are refused: they cannot be re-planned without a jump.
    """
    old = getattr(scheduler, "T_max", getattr(scheduler, "total_steps", None))
    if old is None or not math.isfinite(length) or int(length) == old:
        return scheduler
    length, position, name = int(length), scheduler.last_epoch, type(scheduler).__name__
    if position >= old:
        if finished == "restart":
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
            return CosineAnnealingLR(optimizer, T_max=length - position, eta_min=getattr(scheduler, "eta_min", 0.0))
        raise OptimizationError(
            f"The checkpoint's {name} schedule has ended (step {position} of {old}, lr "
            f"{optimizer.param_groups[0]['lr']:.3g}), and this fit asks for {length}: continuing it would either keep "
            "that lr or climb back to the peak without saying so. Choose: --model.finished_schedule restart (a warm "
            f"restart: a new cosine from the optimizer's lr over the {length - position} added steps), or a new run "
            "with its own schedule.")
    if isinstance(scheduler, CosineAnnealingLR):
        scheduler.T_max = length  # the chainable cosine: the next lr is the new curve's, scaled to this one
        return scheduler
    raise OptimizationError(f"The checkpoint's {name} schedule was planned for {old} steps and this fit has {length}: "
                            f"{name} cannot be stretched without a jump. Resume with the run's own length "
                            "(--trainer.max_epochs / --trainer.max_steps as before), or start a new run.")
