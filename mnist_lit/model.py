"""The network and how it learns: an MLP on 784 pixels, SGD on cross-entropy, one metric object per stage.

    python -m mnist_lit fit --config configs/default.yaml --model.optimizer.init_args.lr 0.05

``MLP`` is a plain ``nn.Module`` that returns logits; ``MNISTClassifier`` wraps any such
network (``model.net`` takes a ``class_path``) with the loss, the optimizer and schedule (any
``torch.optim`` class by config, ``optimization.py``), the metrics and the two training loops.
Softmax appears only in ``predict_step``: the loss takes logits.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
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
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lit.optimization import (
    OptimizationError,
    OptimizerFactory,
    ScheduleFactory,
    build_optimizer,
    build_schedule,
    built_class,
    extend_schedule,
)


class MLP(nn.Module):
    """784 -> hidden1 -> hidden2 -> num_classes with ReLU between; returns logits.

    Args:
        hidden1: width of the first hidden layer.
        hidden2: width of the second hidden layer.
        num_classes: number of outputs (logits).
    """

    def __init__(self, hidden1: PositiveInt = 512, hidden2: PositiveInt = 256, num_classes: PositiveInt = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),  # (B, 28, 28) or (B, 784) -> (B, 784)
            nn.Linear(28 * 28, hidden1), nn.ReLU(),
            nn.Linear(hidden1, hidden2), nn.ReLU(),
            nn.Linear(hidden2, num_classes),  # (B, hidden2) -> (B, 10) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a linear head, (B, 784) pixels -> (B, 10) logits: the example of a swapped
    network (configs/experiment/cnn.yaml, docs/extending.md).

    Args:
        channels: channels of the first conv block (the second has twice as many).
        num_classes: number of outputs (logits).
    """

    def __init__(self, channels: PositiveInt = 16, num_classes: PositiveInt = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),  # (B, 784) -> (B, 1, 28, 28)
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, C, 14, 14)
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, 2C, 7, 7)
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, num_classes),  # -> (B, 10) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.reshape(len(x), -1))


# Callback hooks that Lightning calls per training_step call: on the fast path, once per 16 batches.
PER_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_zero_grad")
# Module hooks that only Lightning's loop calls (the fast path moves batches and steps the optimizer itself).
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer", "backward",
               "optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping")
# Callbacks that change the optimization itself from Lightning's loop (averaging, lr search, accumulation).
ONE_STEP_CALLBACKS = (StochasticWeightAveraging, WeightAveraging, GradientAccumulationScheduler, BaseFinetuning,
                      BatchSizeFinder, LearningRateFinder)


def checkpoint_intervals(trainer: L.Trainer) -> list[int]:
    """Every ``every_n_train_steps`` of the fit's checkpoint callbacks. Read from a private attribute: no public
    one holds it (tests/test_lightning_private.py fails loudly if it moves)."""
    return [callback._every_n_train_steps for callback in trainer.checkpoint_callbacks
            if callback._every_n_train_steps > 0]


def plain(value):
    """A hyperparameter as plain data that a weights-only checkpoint can hold. LightningCLI already gives
    ``{class_path, init_args}`` dicts; from Python a module, class or partial becomes the same kind of
    record, with the init_args that can be known (a module's own are not kept by torch: class only)."""
    if isinstance(value, functools.partial) and (cls := built_class(value)) is not None:
        if all(isinstance(v, (int, float, str, bool, type(None))) for v in value.keywords.values()):
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.keywords)}
        value = cls
    if isinstance(value, nn.Module):
        value = type(value)
    if inspect.isclass(value):
        return {"class_path": f"{value.__module__}.{value.__qualname__}"}
    return value


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely fix."""


class MNISTClassifier(L.LightningModule):
    """A classifier trained by SGD (or any optimizer) on cross-entropy, logging ``{train,val,test}/{loss,acc}``
    and ``val/acc_best``.

    Two ways to train, chosen per fit, with the same result (tests/test_exactness.py checks the weights bit for bit):

    - **the fast path** (the default): one ``training_step`` call runs ``steps_per_training_step``
      ordinary SGD steps on consecutive batches pulled from Lightning's ``dataloader_iter``, so that
      Lightning's per-call work (hooks, logging, progress) is paid once per 16 batches, not per batch;
    - **Lightning's own loop** (automatic optimization, one batch per call), for every fit whose
      Trainer flags or callbacks the fast path cannot honour step for step: gradient clipping or
      accumulation, ``val_check_interval``, ``limit_train_batches``, ``fast_dev_run``, ``overfit_batches``,
      several processes, a callback with per-batch hooks (``one_step_reasons`` lists them). The fit
      then says why in one line.

    Args:
        net: the network, images (B, 784) -> logits (B, 10); None means ``MLP()``.
        optimizer: a ``torch.optim`` class (or your own) with its init_args, given the parameters; None means
            ``SGD(lr=0.1, momentum=0.9, nesterov=True)``, the tested default (configs/default.yaml).
        lr_scheduler: an lr schedule class with its init_args, given the optimizer; its length (``T_max``,
            ``total_steps``) comes from the Trainer. The default: cosine from the optimizer's lr to 0 over the
            run. None keeps the lr constant.
        lr_scheduler_interval: step the schedule after every SGD ``step`` or every ``epoch``; None: per step,
            and per epoch for ``ReduceLROnPlateau`` (after validation), which refuses ``step``.
        lr_scheduler_monitor: the metric ``ReduceLROnPlateau`` watches (``val/loss``, or ``val/acc`` with
            its ``mode: max``).
        finished_schedule: a fit resumed from a checkpoint whose schedule has ended, with more steps to go:
            ``refuse`` it, or ``restart`` the schedule over the added steps (a warm restart). A schedule still
            under way is re-planned to the new length either way (``optimization.extend_schedule``).
        steps_per_training_step: SGD steps per Lightning ``training_step`` call on the fast path; 1 trains
            every fit with Lightning's own loop.
        num_classes: number of classes the metrics count.
        compile: run the network through ``torch.compile`` (compiled when a fit, validate, test or
            predict starts; the first batches of each shape pay the compile time). Checkpoints are the
            same either way.
    """

    def __init__(self, net: nn.Module | None = None, optimizer: OptimizerFactory | None = None,
                 lr_scheduler: ScheduleFactory | None = CosineAnnealingLR,
                 lr_scheduler_interval: Literal["step", "epoch"] | None = None, lr_scheduler_monitor: str = "val/loss",
                 finished_schedule: Literal["refuse", "restart"] = "refuse",
                 steps_per_training_step: PositiveInt = 16, num_classes: PositiveInt = 10, compile: bool = False):
        super().__init__()
        # finished_schedule says how to resume, not what was trained: kept out of the checkpoint's hyperparameters,
        # which LightningCLI puts over the flags given beside --ckpt_path, so that the flag given there applies.
        self.save_hyperparameters(ignore="finished_schedule")
        self.finished_schedule = finished_schedule
        for key in ("net", "optimizer", "lr_scheduler"):  # from Python: what builds them, not pickled objects
            self.hparams[key] = plain(self.hparams[key])
        self.optimizer_factory, self.schedule_factory = optimizer, lr_scheduler
        self.schedule_interval = lr_scheduler_interval or "step"  # "epoch" for ReduceLROnPlateau (configure_optimizers)
        self.net = net if net is not None else MLP(num_classes=num_classes)
        self.net_forward = self.net.forward  # or its compiled version, set in setup()
        # Plain (micro) accuracy; validate_args=False skips per-update range checks that sync the device.
        accuracy = lambda: MulticlassAccuracy(num_classes, average="micro", validate_args=False)  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        # Mean losses: weighted by batch size and synced across DDP ranks once per epoch.
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        # Saved in checkpoints, so a resumed run keeps its best. (The training metrics are not: a checkpoint
        # written at an epoch's end still holds that epoch's counts, which must not leak into the next one.)
        self.val_acc_best.persistent(True)
        self.decided_for, self.lightning_loop = None, True  # the Trainer for which the loop was chosen, the choice
        # This epoch's (predictions, targets, losses, batch sizes), counted into the training metrics at its end:
        # a metric update or self.log costs ~0.3-1 ms, a tenth of a small model's SGD step.
        self.train_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = []
        self.last_loss: torch.Tensor | None = None  # Lightning's loop: the loss of the step being taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_forward(x)  # (B, 784) -> (B, 10) logits

    def setup(self, stage: str) -> None:
        if self.hparams.compile:  # compile the bound forward, not the module: state_dict keys stay unprefixed
            self.net_forward = torch.compile(self.net.forward)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.optimizer_factory, self.parameters())
        self.configured_lrs = [group["lr"] for group in optimizer.param_groups]  # a resume may bring others back
        if self.schedule_factory is None:
            return optimizer
        interval = hp.lr_scheduler_interval or "step"
        steps, epochs = self.run_length()
        scheduler = build_schedule(self.schedule_factory, optimizer, steps, epochs, interval)
        if isinstance(scheduler, ReduceLROnPlateau):
            if hp.lr_scheduler_interval == "step":
                raise OptimizationError("--model.lr_scheduler ReduceLROnPlateau needs a validation result for each "
                                        "step, and validation runs per epoch: set --model.lr_scheduler_interval epoch "
                                        "(or leave it null).")
            interval = "epoch"
            self.check_plateau(scheduler)
        self.schedule_interval = interval  # the fast path steps the schedule itself (sgd_steps, on_train_epoch_end)
        if not self.automatic_optimization:
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval,
                                                         "monitor": hp.lr_scheduler_monitor}}

    def run_length(self) -> tuple[float, float]:
        """The whole run in SGD steps and in epochs (inf when unbounded)."""
        steps = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else math.inf
        if self.trainer.max_steps >= 0 and math.isfinite(steps):  # max_steps may end the run first
            epochs = min(epochs, math.ceil(steps / max(1, self.steps_per_epoch())))
        return steps, epochs

    def on_train_start(self) -> None:
        """A resumed fit (its optimizer and schedule just restored): the lr configured for this fit, if it is
        another than the checkpoint's, and the schedule fitted to this run's length."""
        if self.global_step == 0:
            return
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
            length = steps if self.schedule_interval == "step" else epochs
            configs[0].scheduler = extend_schedule(configs[0].scheduler, optimizer, length, self.finished_schedule)

    def steps_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches
        return math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else 1

    def check_plateau(self, scheduler: ReduceLROnPlateau) -> None:
        monitor, mode = self.hparams.lr_scheduler_monitor, scheduler.mode
        wanted = "max" if monitor.endswith("acc") else "min"
        if mode != wanted:
            raise OptimizationError(f"--model.lr_scheduler ReduceLROnPlateau watches {monitor} (--model."
                                    f"lr_scheduler_monitor) with mode {mode}, but {monitor} gets better as it goes "
                                    f"{'up' if wanted == 'max' else 'down'}: set --model.lr_scheduler.mode {wanted}.")

    # -- which loop trains this fit --------------------------------------------------------------------

    def one_step_reasons(self) -> list[str]:
        """What in this fit only Lightning's one-batch-per-call loop honours; empty: the fast path is exact."""
        trainer = self.trainer
        flags = {
            "--model.steps_per_training_step is 1": self.hparams.steps_per_training_step == 1,
            f"it runs on {trainer.world_size} processes": trainer.world_size > 1,  # DDP syncs once per forward
            "--trainer.gradient_clip_val is set": bool(trainer.gradient_clip_val),
            "--trainer.accumulate_grad_batches is set": trainer.accumulate_grad_batches != 1,
            "--trainer.val_check_interval is set": trainer.val_check_interval != 1.0,
            "--trainer.limit_train_batches is set": trainer.limit_train_batches != 1.0,
            "--trainer.fast_dev_run is set": bool(trainer.fast_dev_run),
            "--trainer.overfit_batches is set": trainer.overfit_batches > 0,
        }
        reasons = [reason for reason, applies in flags.items() if applies]
        # Per-batch hooks would run once per call of 16 batches; model checkpoints and progress bars are
        # exact here (the calls end at every_n_train_steps, the bar counts batches).
        per_batch = [callback for callback in trainer.callbacks
                     if not isinstance(callback, (ModelCheckpoint, ProgressBar))
                     and (isinstance(callback, ONE_STEP_CALLBACKS)
                          or any(is_overridden(hook, callback, L.Callback) for hook in PER_BATCH_HOOKS))]
        reasons += [f"the callback {type(callback).__name__} acts on every batch" for callback in per_batch]
        reasons += [f"{type(self).__name__} overrides {hook}" for hook in (*PER_BATCH_HOOKS, *BATCH_HOOKS)
                    if is_overridden(hook, self, MNISTClassifier)]
        return reasons

    @property
    def automatic_optimization(self) -> bool:
        """Lightning's switch, read before and during a fit (many times a step): True trains with Lightning's
        own loop. Decided once per Trainer: the flags and callbacks it looks at do not change during a fit."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer: nothing to honour, plain automatic optimization
            return True
        if self.decided_for is not trainer:
            self.decided_for, self.lightning_loop = trainer, bool(self.one_step_reasons())
        return self.lightning_loop

    @property
    def training_step(self):
        """The step Lightning calls: ``sgd_steps`` (fast path, takes the ``dataloader_iter``) or ``sgd_step``."""
        return self.sgd_step if self.automatic_optimization else self.sgd_steps

    def on_fit_start(self) -> None:
        reasons = self.one_step_reasons()
        if reasons:
            rank_zero_info(f"mnist_lit: this fit trains with Lightning's own loop, one batch per training_step, "
                           f"because {'; '.join(reasons)}: the fast path (several SGD steps per call) would not "
                           "honour that step for step. Same results, more time per epoch (docs/benchmarks.md).")
            return
        # Lightning's manual_backward runs the backward hooks of callbacks, the module and the precision plugin
        # on every step (~0.3 ms each time, a tenth of a small model's step). Call autograd directly when
        # none of them has anything to do: fp16 loss scaling, or a hook overridden somewhere.
        hooked = [self, *self.trainer.callbacks]
        needs_lightning = (getattr(self.trainer.precision_plugin, "scaler", None) is not None
                           or any(is_overridden(hook, obj, MNISTClassifier if obj is self else L.Callback)
                                  for hook in ("on_before_backward", "on_after_backward") for obj in hooked))
        self.run_backward = self.manual_backward if needs_lightning else torch.Tensor.backward

    # -- Lightning's loop: one batch, one SGD step per call ----------------------------------------------

    def sgd_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)  # (B, 784) -> (B, 10)
        loss = F.cross_entropy(logits, y)
        self.last_loss = loss.detach().view(1)
        self.check_finite(self.last_loss)
        self.train_outputs.append((logits.detach().argmax(1), y, self.last_loss, [len(y)]))
        return loss  # Lightning runs backward, clipping, accumulation and the optimizer step

    def on_before_optimizer_step(self, optimizer) -> None:
        """Lightning's loop: once per SGD step (after all batches of an accumulation), its train/loss point."""
        if self.automatic_optimization:
            self.log_step_points(self.last_loss, [optimizer.param_groups[0]["lr"]], first=self.global_step)

    # -- the fast path: several SGD steps per call -------------------------------------------------------

    def sgd_steps(self, dataloader_iter: Iterator) -> None:  # the name asks Lightning for its iterator
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        losses, lrs, predictions, targets, sizes = [], [], [], [], []
        for _ in range(self.steps_this_call()):
            try:
                (x, y), _, _ = next(dataloader_iter)
            except StopIteration:  # the epoch's last call may hold fewer batches
                break
            x, y = x.to(self.device), y.to(self.device)  # no-op for MNISTDataModule, whose data lives there
            logits = self(x)  # (B, 784) -> (B, 10)
            loss = F.cross_entropy(logits, y)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            self.run_backward(loss)
            optimizer.step()  # Lightning's optimizer: counts global_step, runs on_before_optimizer_step
            if scheduler is not None and self.schedule_interval == "step":
                scheduler.step()
            losses.append(loss.detach())
            predictions.append(logits.detach().argmax(1))
            targets.append(y)
            sizes.append(len(y))
        if not losses:
            return
        losses = torch.stack(losses)  # (steps,) one loss per SGD step
        self.check_finite(losses)  # one device sync per call
        # Lightning counts one logging step per call; count SGD steps instead, as its own loop does, so that
        # TensorBoard's x-axis and log_every_n_steps mean optimizer steps. No public API sets this counter
        # (tests/test_lightning_private.py fails loudly if it moves).
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(losses) - 1
        self.train_outputs.append((torch.cat(predictions), torch.cat(targets), losses, sizes))
        self.log_step_points(losses, lrs, first=self.global_step - len(losses))

    def steps_this_call(self) -> int:
        """SGD steps for the next call: ``steps_per_training_step``, ending early at ``max_steps`` and at every
        multiple of a checkpoint's ``every_n_train_steps`` (checked by Lightning after each call)."""
        step, steps = self.global_step, self.hparams.steps_per_training_step
        if self.trainer.max_steps >= 0:
            steps = min(steps, self.trainer.max_steps - step)
        for every in checkpoint_intervals(self.trainer):
            steps = min(steps, every - step % every)
        return steps

    # -- shared by both loops ----------------------------------------------------------------------------

    def monitored_metric(self) -> torch.Tensor:
        monitor = self.hparams.lr_scheduler_monitor
        if monitor not in self.trainer.callback_metrics:
            raise OptimizationError(f"--model.lr_scheduler_monitor is {monitor}, which this run does not log at the "
                                    "end of an epoch: use val/loss or val/acc (with validation every epoch).")
        return self.trainer.callback_metrics[monitor]

    def check_finite(self, losses: torch.Tensor) -> None:
        """Stop at the first NaN or infinite loss, naming the step and the fix (one device sync)."""
        if torch.isfinite(losses).all():
            return
        bad = next(i for i, loss in enumerate(losses) if not torch.isfinite(loss))
        step = self.global_step - (len(losses) if not self.automatic_optimization else 0) + bad
        raise TrainingDiverged(
            f"The training loss became {losses[bad].item()} at SGD step {step} (epoch {self.current_epoch}, lr "
            f"{self.optimizers().param_groups[0]['lr']:.3g}); training stopped and no checkpoint was written from "
            "it. The learning rate is most likely too high for this network and batch size: lower "
            "--model.optimizer.init_args.lr (0.1 is the tested default for SGD; try 10x lower), or resume from the "
            "last good checkpoint with a lower one: python -m mnist_lit fit --ckpt_path <this run>/checkpoints/"
            "last.ckpt --model.optimizer.init_args.lr 0.01.")

    def log_step_points(self, losses: torch.Tensor, lrs: list[float], first: int) -> None:
        """train/loss and train/lr of the SGD steps ``first``, ``first + 1``, ... (one per loss) whose number is a
        multiple of log_every_n_steps, where Lightning's loop puts them; to every logger (rank 0)."""
        every = self.trainer.log_every_n_steps
        due = [i for i in range(len(losses)) if every and (first + i + 1) % every == 0]
        if due:
            # The progress bar's value (batch_size: no mean over batches is taken, Lightning only asks for one).
            self.log("train/loss", losses[due[-1]], prog_bar=True, logger=False, batch_size=1)
        if not due or not self.trainer.is_global_zero:
            return
        for i in due:
            for logger in self.loggers:
                logger.log_metrics({"train/loss": losses[i].item(), "train/lr": lrs[i]}, step=first + i)

    def on_train_epoch_end(self) -> None:
        """The epoch's train/acc and train/loss_epoch (sample-weighted), from every step's outputs; on the fast
        path, a per-epoch schedule's step (Lightning's loop steps it itself, after this hook)."""
        scheduler = self.lr_schedulers() if not self.automatic_optimization else None
        if scheduler is not None and self.schedule_interval == "epoch":
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(self.monitored_metric())
            else:
                scheduler.step()
        if not self.train_outputs:
            return
        predictions, targets, losses, sizes = zip(*self.train_outputs, strict=True)
        self.train_outputs = []
        losses = torch.cat(losses)
        self.train_acc.update(torch.cat(predictions), torch.cat(targets))
        self.train_loss.update(losses, weight=torch.tensor([n for s in sizes for n in s], device=losses.device))
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=1)  # metric objects:
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=1)  # batch_size unused

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        accuracy, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        accuracy.update(logits, y)
        mean_loss.update(F.cross_entropy(logits, y), weight=len(y))
        # Metric objects: Lightning computes, syncs across ranks and resets them at epoch end.
        self.log(f"{stage}/loss", mean_loss, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=stage == "val")
        return logits  # (B, 10), for callbacks (report.py: confusion matrix, misclassified digits)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a check of the code before training, not a result
            return
        self.val_acc_best.update(self.val_acc.compute())
        # Computed from the synced val/acc, so equal on every rank: sync_dist only silences Lightning's warning.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.evaluate(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        return self(x).softmax(dim=1)  # (B, 10) class probabilities
