"""The training engine under every mnist_lit module: the fast path, the choice of loop, and what a resume re-plans.

    python -m mnist_lit fit --config configs/default.yaml                      # the fast path
    python -m mnist_lit fit --config configs/default.yaml --trainer.gradient_clip_val 1   # Lightning's loop, said once

A module built on ``Engine`` writes the science, one method: ``model_step(batch) -> (loss, logits, targets)``,
the forward pass and the loss that training, validation and test share (``MNISTClassifier`` in model.py). The
engine trains it one of two ways per fit, with the same weights bit for bit (tests/test_exactness.py):

- **the fast path** (the default): one ``training_step`` call runs up to ``steps_per_training_step`` ordinary
  SGD steps on consecutive batches pulled from Lightning's ``dataloader_iter``, and ends after about a second
  (``CALL_SECONDS``, so that the progress bar moves), so that Lightning's per-call work (hooks, logging,
  progress bar) is paid once per second of training or per 1024 batches, not per batch;
- **Lightning's own loop** (automatic optimization, one batch per call), for every fit that asks for something
  only it honours step for step (``one_step_reasons``): gradient clipping or accumulation, ``val_check_interval``,
  several processes, a callback or module with per-batch hooks, a module's own ``training_step`` or
  ``configure_optimizers``. The fit says why in one line. An average of the weights (Lightning's
  ``WeightAveraging``, ``EMAWeightAveraging``) keeps the fast path: its update runs after every SGD step.

A module that sets ``self.automatic_optimization = False`` and writes its own ``training_step`` trains itself,
as Lightning documents manual optimization: the engine then steps aside from training (schedules, train/*
points), saying so. The engine's own part of ``on_fit_start``, ``on_train_start``, ``on_before_optimizer_step``
and ``on_train_epoch_end`` runs whether or not a subclass's override of them calls ``super()``, so that an
override cannot silently stop a schedule.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelCheckpoint,
    ProgressBar,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim.lr_scheduler import ReduceLROnPlateau

from mnist_lit.optimization import OptimizationError, build_optimizer, build_schedule, extend_schedule

# A fast-path call ends after this many seconds of training (or steps_per_training_step SGD steps), so that the
# progress bar moves at least about once a second while Lightning's per-call work stays a few ms a second
# (scripts/measure/call_length.py measures what shorter calls cost).
CALL_SECONDS = 1.0
# Callback hooks that Lightning calls per training_step call: on the fast path, once per call.
PER_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_zero_grad")
# Module hooks that only Lightning's loop calls (the fast path moves batches and steps the optimizer itself), and
# configure_optimizers, whose schedule Lightning steps by the interval it returns.
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer", "backward",
               "optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping", "configure_optimizers")
# Callbacks that change the optimization itself from Lightning's loop (SWA's own lr schedule, lr search,
# accumulation). WeightAveraging (EMAWeightAveraging, or SWA as WeightAveraging) keeps the fast path: ``averages``.
ONE_STEP_CALLBACKS = (StochasticWeightAveraging, GradientAccumulationScheduler, BaseFinetuning,
                      BatchSizeFinder, LearningRateFinder)


def averages(callback: L.Callback) -> bool:
    """A ``WeightAveraging`` callback whose only per-batch work is its own ``on_train_batch_end`` (update the average
    after each optimizer step, when ``should_update`` says so): the fast path calls that hook after every SGD step,
    as Lightning's loop does, so the averaged weights are the same bit for bit (tests/test_exactness.py)."""
    return isinstance(callback, WeightAveraging) and not any(is_overridden(hook, callback, WeightAveraging)
                                                             for hook in PER_BATCH_HOOKS)
# The hooks in which the engine does its own work; a subclass's override of one gets it all the same.
ENGINE_HOOKS = ("on_fit_start", "on_train_start", "on_before_optimizer_step", "on_train_epoch_end")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely fix."""


def checkpoint_intervals(trainer: L.Trainer) -> list[int]:
    """Every ``every_n_train_steps`` of the fit's checkpoint callbacks. Read from a private attribute: no public
    one holds it (tests/test_lightning_private.py fails loudly if it moves)."""
    return [callback._every_n_train_steps for callback in trainer.checkpoint_callbacks
            if callback._every_n_train_steps > 0]


def own_training_step(module: L.LightningModule) -> bool:
    """Whether the module's class (or a parent below Engine) writes its own ``training_step``."""
    return not isinstance(next(vars(c)["training_step"] for c in type(module).__mro__ if "training_step" in vars(c)),
                          property)


def batch_size(batch) -> int:
    """The batch's size as Lightning finds it (the first tensor's length); 1 for what holds no tensor."""
    try:
        return extract_batch_size(batch)
    except (MisconfigurationException, RecursionError):
        return 1


def on_device(batch, device: torch.device) -> bool:
    """Whether an (x, y)-like batch's tensors are all on ``device`` already (a check of ~1 us, not a move)."""
    return isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch)


def recorded(training_step):
    """A subclass's own ``training_step``, unchanged, whose returned loss also feeds train/loss (Lightning's loop)."""
    @functools.wraps(training_step)  # keeps the signature Lightning inspects (batch, batch_idx, dataloader_iter)
    def step(self, *args, **kwargs):
        outer, self.inside_own_step = not self.inside_own_step, True  # a subclass's step may call its parent's
        try:
            output = training_step(self, *args, **kwargs)
        finally:
            self.inside_own_step = not outer
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if outer and self.loop == "lightning" and isinstance(loss, torch.Tensor) and args:  # once, what it returns
            self.record(loss, None, None, batch_size(args[0]))
        return output
    step.engine_wrapped = True
    return step


def engine_part(hook: str, override):
    """A subclass's override of an engine hook, followed by the engine's own part when the override skipped it."""
    @functools.wraps(override)
    def run(self, *args, **kwargs):
        self.engine_ran.discard(hook)
        result = override(self, *args, **kwargs)
        if hook not in self.engine_ran:
            getattr(Engine, hook)(self, *args, **kwargs)
        return result
    run.engine_wrapped = True
    return run


class Engine(L.LightningModule):
    """The training loops and bookkeeping for a module that defines ``model_step`` (module docstring).

    What the engine reads of the module, each set by its ``__init__`` (``MNISTClassifier``'s are typed arguments):
    ``optimizer_factory`` and ``schedule_factory`` (None: SGD 0.1, momentum 0.9, Nesterov; no schedule),
    ``schedule_interval`` (``step``, ``epoch`` or None), ``schedule_monitor``, ``finished_schedule`` and
    ``steps_per_training_step``.
    """

    optimizer_factory = schedule_factory = schedule_interval = None
    schedule_monitor, finished_schedule, steps_per_training_step = "val/loss", "refuse", 1024

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = vars(cls).get("training_step")
        if step is not None and not isinstance(step, property) and not hasattr(step, "engine_wrapped"):
            cls.training_step = recorded(step)
        for hook in ENGINE_HOOKS:
            if hook in vars(cls) and not hasattr(vars(cls)[hook], "engine_wrapped"):
                setattr(cls, hook, engine_part(hook, vars(cls)[hook]))

    def __init__(self):
        super().__init__()
        self.decided_for, self.loop = None, "lightning"  # the Trainer for which the loop was chosen, the choice
        self.user_automatic = None  # what the module set automatic_optimization to, if it did
        self.engine_ran: set[str] = set()
        self.inside_own_step = False
        self.logs_own_loss = False  # the module's own training_step logs train/loss itself (Engine.log)
        # This epoch's (logits or None, targets or None, losses, batch sizes), counted into the training metrics at
        # its end: a metric update or self.log costs ~0.3-1 ms, a tenth of a small model's SGD step.
        self.train_outputs: list[tuple] = []
        self.last_loss: torch.Tensor | None = None  # Lightning's loop: the loss of the step being taken

    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, logits, targets) of one batch: the forward pass and the loss, shared by every stage."""
        raise NotImplementedError(f"{type(self).__name__} has no model_step(batch) -> (loss, logits, targets): "
                                  "write one (mnist_lit.model.MNISTClassifier's is the example), or a training_step.")

    # -- which loop trains this fit --------------------------------------------------------------------

    def one_step_reasons(self) -> list[str]:
        """What in this fit only Lightning's one-batch-per-call loop honours; empty: the fast path is exact."""
        trainer, name = self.trainer, type(self).__name__
        flags = {
            "--model.steps_per_training_step is 1": self.steps_per_training_step == 1,
            f"it runs on {trainer.world_size} processes": trainer.world_size > 1,  # DDP syncs once per forward
            "--trainer.gradient_clip_val is set": bool(trainer.gradient_clip_val),
            "--trainer.accumulate_grad_batches is set": trainer.accumulate_grad_batches != 1,
            "--trainer.val_check_interval is set": trainer.val_check_interval != 1.0,
            "--trainer.limit_train_batches is set": trainer.limit_train_batches != 1.0,
            "--trainer.fast_dev_run is set": bool(trainer.fast_dev_run),
            "--trainer.overfit_batches is set": trainer.overfit_batches > 0,
            f"{name} writes its own training_step": own_training_step(self),
            f"{name} sets automatic_optimization = True": self.user_automatic is True,
        }
        reasons = [reason for reason, applies in flags.items() if applies]
        # Per-batch hooks would run once per call of many batches; model checkpoints and progress bars are
        # exact here (the calls end at every_n_train_steps, the bar counts batches).
        per_batch = [callback for callback in trainer.callbacks
                     if not isinstance(callback, (ModelCheckpoint, ProgressBar)) and not averages(callback)
                     and (isinstance(callback, ONE_STEP_CALLBACKS)
                          or any(is_overridden(hook, callback, L.Callback) for hook in PER_BATCH_HOOKS))]
        reasons += [f"the callback {type(callback).__name__} acts on every batch" for callback in per_batch]
        reasons += [f"{name} overrides {hook}" for hook in (*PER_BATCH_HOOKS, *BATCH_HOOKS)
                    if is_overridden(hook, self, Engine)]
        return reasons

    def choose_loop(self) -> str:
        if self.user_automatic is False and own_training_step(self):
            return "manual"  # the module's own manual optimization
        reasons = self.one_step_reasons()
        if self.user_automatic is False and reasons:
            raise MisconfigurationException(
                f"{type(self).__name__} sets automatic_optimization = False but writes no training_step of its own, "
                f"so mnist_lit's fast path (manual optimization, several SGD steps per call) would train it, and it "
                f"cannot honour that {'; '.join(reasons)}: write a training_step (Lightning's manual optimization), "
                "or drop automatic_optimization = False so that Lightning's own loop trains this fit.")
        return "lightning" if reasons else "fast"

    @property
    def automatic_optimization(self) -> bool:
        """Lightning's switch, read before and during a fit (many times a step): True trains with Lightning's
        own loop. Decided once per Trainer: the flags and callbacks it looks at do not change during a fit."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer: nothing to honour, plain automatic optimization
            return self.user_automatic is not False
        if self.decided_for is not trainer:
            self.decided_for, self.loop = trainer, self.choose_loop()
        return self.loop == "lightning"

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        """Lightning's idiom: ``self.automatic_optimization = False`` with a training_step of the module's own."""
        self.user_automatic, self.decided_for = bool(value), None

    @property
    def training_step(self):
        """The step Lightning calls: ``fast_steps`` (takes the ``dataloader_iter``) or ``lightning_step``."""
        return self.lightning_step if self.automatic_optimization else self.fast_steps

    def on_fit_start(self) -> None:
        self.engine_ran.add("on_fit_start")
        self.automatic_optimization  # noqa: B018  (decides the loop for this Trainer if nothing asked yet)
        if self.loop == "manual":
            rank_zero_info(f"mnist_lit: {type(self).__name__} trains itself (automatic_optimization = False and its "
                           "own training_step): stepping its lr schedules and logging train/loss are its own, as "
                           "Lightning documents manual optimization.")
            return
        reasons = self.one_step_reasons() if self.loop == "lightning" else []
        if reasons:
            own = " train/acc steps aside (that step returns a loss, no logits): override model_step instead to " \
                  "keep the fast path and train/acc." if own_training_step(self) else ""
            rank_zero_info(f"mnist_lit: this fit trains with Lightning's own loop, one batch per training_step, "
                           f"because {'; '.join(reasons)}: the fast path (several SGD steps per call) would not "
                           f"honour that step for step. Same results, more time per epoch (docs/benchmarks.md).{own}")
            return
        # Lightning's manual_backward runs the backward hooks of callbacks, the module and the precision plugin
        # on every step (~0.3 ms each time, a tenth of a small model's step). Call autograd directly when
        # none of them has anything to do: fp16 loss scaling, or a hook overridden somewhere.
        hooked = [self, *self.trainer.callbacks]
        needs_lightning = (getattr(self.trainer.precision_plugin, "scaler", None) is not None
                           or any(is_overridden(hook, obj, Engine if obj is self else L.Callback)
                                  for hook in ("on_before_backward", "on_after_backward") for obj in hooked))
        self.run_backward = self.manual_backward if needs_lightning else torch.Tensor.backward
        # Likewise Lightning's optimizer wrapper: through the strategy, the precision plugin, a closure and the
        # profiler, it calls on_before_optimizer_step on every callback, building each one's state_key string on
        # the way (~0.1 ms a step). Where those layers add nothing (one device, no loss scaling, no profiler), the
        # fast path steps the torch optimizer itself, calls the hooks that someone overrides, and counts the step
        # as Lightning's manual loop does (tests/test_lightning_private.py watches that counter).
        plugin, strategy = self.trainer.precision_plugin, self.trainer.strategy
        self.step_directly = (isinstance(self.trainer.profiler, PassThroughProfiler)
                              and getattr(plugin, "scaler", None) is None
                              and type(plugin).optimizer_step in (Precision.optimizer_step,
                                                                  MixedPrecision.optimizer_step)
                              and type(strategy).optimizer_step is Strategy.optimizer_step)
        self.step_hooks = [callback for callback in self.trainer.callbacks
                           if is_overridden("on_before_optimizer_step", callback, L.Callback)]
        self.averagers = [callback for callback in self.trainer.callbacks if averages(callback)]

    # -- the optimizer and its schedule ----------------------------------------------------------------

    def configure_optimizers(self):
        """The module's optimizer and schedule (``optimizer_factory``, ``schedule_factory``), the schedule's length
        the run's own, stepped per SGD step or per epoch by both loops alike."""
        optimizer = build_optimizer(self.optimizer_factory, [p for p in self.parameters() if p.requires_grad])
        self.configured_lrs = [group["lr"] for group in optimizer.param_groups]  # a resume may bring others back
        if self.schedule_factory is None:
            return optimizer
        interval = self.schedule_interval or "step"
        steps, epochs = self.run_length()
        scheduler = build_schedule(self.schedule_factory, optimizer, steps, epochs, interval)
        if isinstance(scheduler, ReduceLROnPlateau):
            if self.schedule_interval == "step":
                raise OptimizationError("--model.lr_scheduler ReduceLROnPlateau needs a validation result for each "
                                        "step, and validation runs per epoch: set --model.lr_scheduler_interval epoch "
                                        "(or leave it null).")
            interval = "epoch"
            self.check_plateau(scheduler)
        self.stepped_per = interval  # the fast path steps the schedule itself (fast_steps, on_train_epoch_end)
        if not self.automatic_optimization:
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval,
                                                         "monitor": self.schedule_monitor}}

    def run_length(self) -> tuple[float, float]:
        """The whole run in SGD steps and in epochs (inf when unbounded)."""
        steps = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else math.inf
        if self.trainer.max_steps >= 0 and math.isfinite(steps):  # max_steps may end the run first
            epochs = min(epochs, math.ceil(steps / max(1, self.steps_per_epoch())))
        return steps, epochs

    def steps_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches
        return math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else 1

    def check_plateau(self, scheduler: ReduceLROnPlateau) -> None:
        monitor, mode = self.schedule_monitor, scheduler.mode
        wanted = "max" if monitor.endswith("acc") else "min"
        if mode != wanted:
            raise OptimizationError(f"--model.lr_scheduler ReduceLROnPlateau watches {monitor} (--model."
                                    f"lr_scheduler_monitor) with mode {mode}, but {monitor} gets better as it goes "
                                    f"{'up' if wanted == 'max' else 'down'}: set --model.lr_scheduler.mode {wanted}.")

    def on_train_start(self) -> None:
        """A resumed fit (its optimizer and schedule just restored): the lr configured for this fit, if it is
        another than the checkpoint's, and the schedule fitted to this run's length."""
        self.engine_ran.add("on_train_start")
        if self.global_step == 0 or is_overridden("configure_optimizers", self, Engine) or self.loop == "manual":
            return  # a module's own optimizers and schedules are its own to resume
        optimizer = self.optimizers(use_pl_optimizer=False)
        configs = self.trainer.lr_scheduler_configs
        for i, (group, configured) in enumerate(zip(optimizer.param_groups, self.configured_lrs, strict=True)):
            planned = group.get("initial_lr", group["lr"])  # the checkpoint's run's lr (its schedule's peak)
            if configured != planned:  # asked for on purpose: the schedule goes on from here, scaled to it
                group["lr"] *= configured / planned
                group["initial_lr"] = configured
                if configs:
                    configs[0].scheduler.base_lrs[i] = configured
                rank_zero_info(f"mnist_lit: resumed with lr {configured:g} as configured (the checkpoint's run had "
                               f"{planned:g}): the lr goes on from {group['lr']:.3g}, its schedule scaled to it.")
        if configs:
            steps, epochs = self.run_length()
            length = steps if self.stepped_per == "step" else epochs
            configs[0].scheduler = extend_schedule(configs[0].scheduler, optimizer, length, self.finished_schedule)

    # -- Lightning's loop: one batch, one SGD step per call ----------------------------------------------

    def lightning_step(self, batch, batch_idx: int | None = None) -> torch.Tensor:
        loss, logits, targets = self.model_step(batch)
        if not self.inside_own_step:  # called by a subclass's own training_step: recorded there
            self.record(loss, logits, targets, len(targets) if targets is not None else batch_size(batch))
        return loss  # Lightning runs backward, clipping, accumulation and the optimizer step

    def record(self, loss: torch.Tensor, logits, targets, size: int) -> None:
        self.last_loss = loss.detach().float().view(1)
        self.check_finite(self.last_loss)
        self.train_outputs.append((None if logits is None else [logits.detach()],
                                   None if targets is None else [targets], self.last_loss, [size]))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Lightning's loop: once per SGD step (after all batches of an accumulation), its train/loss point."""
        self.engine_ran.add("on_before_optimizer_step")
        if self.loop == "lightning" and self.last_loss is not None:
            self.log_step_points(self.last_loss, [optimizer.param_groups[0]["lr"]], first=self.global_step,
                                 with_loss=not self.logs_own_loss)

    def log(self, name: str, value, *args, **kwargs) -> None:
        """Lightning's ``self.log``. A training_step of the module's own that logs ``train/loss`` itself keeps that
        curve; the engine then writes only ``train/lr`` at each step, so that no step has two loss points."""
        if self.inside_own_step and name == "train/loss":
            self.logs_own_loss = True
        super().log(name, value, *args, **kwargs)

    # -- the fast path: several SGD steps per call -------------------------------------------------------

    def step_optimizer(self, optimizer: torch.optim.Optimizer, progress) -> None:
        """One SGD step as Lightning's optimizer wrapper takes it, without its layers (on_fit_start)."""
        progress.increment_ready()
        for callback in self.step_hooks:
            callback.on_before_optimizer_step(self.trainer, self, optimizer)
        self.on_before_optimizer_step(optimizer)
        optimizer.step()
        progress.increment_completed()  # global_step, on Lightning's manual loop

    def fast_steps(self, dataloader_iter: Iterator) -> None:  # the name asks Lightning for its iterator
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        per_step = scheduler is not None and self.stepped_per == "step"
        if self.step_directly:
            torch_optimizer = optimizer.optimizer  # zero_grad and param_groups are the same object's either way
            step = functools.partial(self.step_optimizer, torch_optimizer,
                                     self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress)
        else:
            torch_optimizer, step = optimizer, optimizer.step  # Lightning's: counts global_step, runs the hooks
        device = self.device
        losses, lrs, outputs, targets, sizes = [], [], [], [], []
        ends = time.perf_counter() + CALL_SECONDS
        for _ in range(self.steps_this_call()):
            try:
                batch, _, _ = next(dataloader_iter)
            except StopIteration:  # the epoch's last call may hold fewer batches
                break
            if not on_device(batch, device):  # MNISTDataModule's batches already live there
                batch = move_data_to_device(batch, device)
            # Before the forward pass, as Lightning's loop does: the last step's gradients are kept until the next
            # step begins, and the memory they free is what the forward pass fills next (still in cache).
            torch_optimizer.zero_grad(set_to_none=True)
            loss, logits, y = self.model_step(batch)
            lrs.append(torch_optimizer.param_groups[0]["lr"])
            self.run_backward(loss)
            step()
            if per_step:
                scheduler.step()
            for callback in self.averagers:  # after each SGD step, as Lightning's loop calls it (``averages``)
                callback.on_train_batch_end(self.trainer, self, None, batch, 0)
            losses.append(loss.detach())
            outputs.append(logits.detach() if logits is not None else None)
            targets.append(y)
            sizes.append(len(y) if y is not None else batch_size(batch))
            if time.perf_counter() > ends:  # the call's boundary never changes the optimization, only the bar
                break
        if not losses:
            return
        losses = torch.stack(losses).float()  # (steps,) one loss per SGD step
        self.check_finite(losses)  # one device sync per call
        # Lightning counts one logging step per call; count SGD steps instead, as its own loop does, so that
        # TensorBoard's x-axis and log_every_n_steps mean optimizer steps. No public API sets this counter
        # (tests/test_lightning_private.py fails loudly if it moves).
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(losses) - 1
        self.train_outputs.append((None if outputs[0] is None else outputs, None if targets[0] is None else targets,
                                   losses, sizes))
        self.log_step_points(losses, lrs, first=self.global_step - len(losses))

    def steps_this_call(self) -> int:
        """SGD steps for the next call: ``steps_per_training_step``, ending early at ``max_steps`` and at every
        multiple of a checkpoint's ``every_n_train_steps`` (checked by Lightning after each call)."""
        step, steps = self.global_step, self.steps_per_training_step
        if self.trainer.max_steps >= 0:
            steps = min(steps, self.trainer.max_steps - step)
        for every in checkpoint_intervals(self.trainer):
            steps = min(steps, every - step % every)
        return steps

    # -- shared by both loops ----------------------------------------------------------------------------

    def check_finite(self, losses: torch.Tensor) -> None:
        """Stop at the first NaN or infinite loss, naming the step and the fix (one device sync)."""
        if torch.isfinite(losses).all():
            return
        bad = next(i for i, loss in enumerate(losses) if not torch.isfinite(loss))
        step = self.global_step - (len(losses) if self.loop == "fast" else 0) + bad
        raise TrainingDiverged(
            f"The training loss became {losses[bad].item()} at SGD step {step} (epoch {self.current_epoch}, lr "
            f"{self.optimizers().param_groups[0]['lr']:.3g}); training stopped and no checkpoint was written from "
            "it. The learning rate is most likely too high for this network and batch size: lower "
            "--model.optimizer.init_args.lr (0.1 is the tested default for SGD; try 10x lower), or resume from the "
            "last good checkpoint with a lower one: python -m mnist_lit fit --ckpt_path <this run>/checkpoints/"
            "last.ckpt --model.optimizer.init_args.lr 0.01.")

    def log_step_points(self, losses: torch.Tensor, lrs: list[float], first: int, with_loss: bool = True) -> None:
        """train/loss and train/lr of the SGD steps ``first``, ``first + 1``, ... (one per loss) whose number is a
        multiple of log_every_n_steps, where Lightning's loop puts them; to every logger (rank 0)."""
        every = self.trainer.log_every_n_steps
        due = [i for i in range(len(losses)) if every and (first + i + 1) % every == 0]
        if due and with_loss:
            # The progress bar's value (batch_size: no mean over batches is taken, Lightning only asks for one).
            self.log("train/loss", losses[due[-1]], prog_bar=True, logger=False, batch_size=1)
        if not due or not self.trainer.is_global_zero:
            return
        for i in due:
            points = {"train/loss": losses[i].item(), "train/lr": lrs[i]} if with_loss else {"train/lr": lrs[i]}
            for logger in self.loggers:
                logger.log_metrics(points, step=first + i)

    def on_train_epoch_end(self) -> None:
        """On the fast path, a per-epoch schedule's step (Lightning's loop steps it itself, after this hook); then
        the epoch's training metrics, from every step's outputs (``log_training_epoch``)."""
        self.engine_ran.add("on_train_epoch_end")
        scheduler = self.lr_schedulers() if self.loop == "fast" else None
        if scheduler is not None and self.stepped_per == "epoch":
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(self.monitored_metric())
            else:
                scheduler.step()
        outputs, self.train_outputs = self.train_outputs, []
        if not outputs:
            return
        logits, targets, losses, sizes = zip(*outputs, strict=True)
        known = all(part is not None for part in (*logits, *targets))
        self.log_training_epoch(torch.cat([t for part in logits for t in part]) if known else None,
                                torch.cat([t for part in targets for t in part]) if known else None,
                                torch.cat(losses), [n for part in sizes for n in part])

    def log_training_epoch(self, logits: torch.Tensor | None, targets: torch.Tensor | None, losses: torch.Tensor,
                           sizes: list[int]) -> None:
        """The epoch's training metrics from its steps: every step's logits and targets (None when a step of the
        module's own returned only its loss), loss and batch size. Here: the sample-weighted train/loss_epoch."""
        weights = torch.tensor(sizes, dtype=losses.dtype, device=losses.device)
        self.log("train/loss_epoch", (losses * weights).sum() / weights.sum(), on_step=False, on_epoch=True,
                 batch_size=1, sync_dist=True)

    def monitored_metric(self) -> torch.Tensor:
        monitor = self.schedule_monitor
        if monitor not in self.trainer.callback_metrics:
            raise OptimizationError(f"--model.lr_scheduler_monitor is {monitor}, which this run does not log at the "
                                    "end of an epoch: use val/loss or val/acc (with validation every epoch).")
        return self.trainer.callback_metrics[monitor]
