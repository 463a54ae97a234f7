"""The science: an MLP on 784 pixels, its loss, its metrics and its optimizer, as a LightningModule.

    python -m mnist_lit fit --config configs/default.yaml --model.optimizer.init_args.lr 0.05
    python -m mnist_lit fit --config configs/default.yaml --config configs/examples/focal.yaml   # a subclass

``MLP`` is a plain ``nn.Module`` that returns logits; ``MNISTClassifier`` wraps any such network
(``model.net`` takes a ``class_path``) with the loss (``loss``), the one step every stage shares
(``model_step``), the metrics, and the optimizer and schedule (any ``torch.optim`` class by config,
``optimization.py``). How it trains is ``engine.py``'s. ``--model`` takes this class (the default), a
subclass of it, or any other LightningModule. Softmax appears only in ``predict_step``: the loss takes logits.
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lit.engine import Engine
from mnist_lit.optimization import OptimizerFactory, ScheduleFactory, built_class

Fraction = ClosedUnitInterval  # a float in [0, 1]


class MLP(nn.Module):
    """in_features (784) -> hidden1 -> hidden2 -> num_classes with ReLU between; returns logits. Dropout
    (Srivastava et al. 2014: 0.2 on the pixels, 0.5 on the hidden units) zeroes that fraction of a layer's inputs
    while training, scaling the rest up to keep their mean; evaluation uses every unit. At 0 (the default) it is not
    applied at all: the same arithmetic, and the same random draws, as a network without it.

    Args:
        hidden1: width of the first hidden layer.
        hidden2: width of the second hidden layer.
        num_classes: number of outputs (logits).
        dropout: the fraction of each hidden layer's units dropped while training.
        input_dropout: the fraction of the input values (pixels) dropped while training.
        in_features: values per example, flattened: 784 for 28x28 images, C*H*W for another data module's.
    """

    def __init__(self, hidden1: PositiveInt = 512, hidden2: PositiveInt = 256, num_classes: PositiveInt = 10,
                 dropout: Fraction = 0.0, input_dropout: Fraction = 0.0, in_features: PositiveInt = 28 * 28):
        super().__init__()
        self.layers = nn.Sequential(  # the checkpoints' keys: net.layers.{1,3,5}.{weight,bias}
            nn.Flatten(),  # (B, 28, 28) or (B, 784) -> (B, 784); any (B, ...) -> (B, in_features)
            nn.Linear(in_features, hidden1), nn.ReLU(),
            nn.Linear(hidden1, hidden2), nn.ReLU(),
            nn.Linear(hidden2, num_classes),  # (B, hidden2) -> (B, 10) logits
        )
        self.dropout, self.input_dropout = dropout, input_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and (self.dropout or self.input_dropout)):
            return self.layers(x)
        flatten, first, relu1, second, relu2, last = self.layers
        x = F.dropout(flatten(x), self.input_dropout) if self.input_dropout else flatten(x)
        x = F.dropout(relu1(first(x)), self.dropout) if self.dropout else relu1(first(x))
        x = F.dropout(relu2(second(x)), self.dropout) if self.dropout else relu2(second(x))
        return last(x)


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



class MNISTClassifier(Engine):
    """A classifier trained by SGD (or any optimizer) on cross-entropy, logging ``{train,val,test}/{loss,acc}``
    and ``val/acc_best``. The science is here; how it trains (the fast path or Lightning's loop, the same weights
    bit for bit) is ``mnist_lit.engine.Engine``'s.

    To change the loss, override ``loss(logits, targets)``; to change what a batch computes (a second network, a
    teacher, mixup), override ``model_step(batch)``. Both keep the fast path, and training, validation and test
    all use them. A ``training_step`` of your own trains with Lightning's loop, as Lightning documents it
    (docs/extending.md, "Add a loss or a training method").

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
        steps_per_training_step: SGD steps per Lightning ``training_step`` call on the fast path, at most (a
            call also ends after about a second, so that the progress bar moves); 1 trains every fit with
            Lightning's own loop.
        num_classes: number of classes the metrics count.
        label_smoothing: cross-entropy against targets that give this much of their probability evenly to all
            classes (Szegedy et al. 2016; ``F.cross_entropy``'s ``label_smoothing``), in ``loss``, so in every
            stage's loss (train, val and test/loss; the accuracies are untouched); 0 is plain cross-entropy. A
            subclass with a ``loss`` of its own refuses it.
        compile: run the network through ``torch.compile`` (compiled when a fit, validate, test or
            predict starts; the first batches of each shape pay the compile time). Checkpoints are the
            same either way.
    """

    def __init__(self, net: nn.Module | None = None, optimizer: OptimizerFactory | None = None,
                 lr_scheduler: ScheduleFactory | None = CosineAnnealingLR,
                 lr_scheduler_interval: Literal["step", "epoch"] | None = None, lr_scheduler_monitor: str = "val/loss",
                 finished_schedule: Literal["refuse", "restart"] = "refuse",
                 steps_per_training_step: PositiveInt = 1024, num_classes: PositiveInt = 10,
                 label_smoothing: Fraction = 0.0, compile: bool = False):
        super().__init__()
        # finished_schedule says how to resume, not what was trained: kept out of the checkpoint's hyperparameters,
        # which LightningCLI puts over the flags given beside --ckpt_path, so that the flag given there applies.
        self.save_hyperparameters(ignore="finished_schedule")
        for key in ("net", "optimizer", "lr_scheduler"):  # from Python: what builds them, not pickled objects
            self.hparams[key] = plain(self.hparams[key])
        # What the engine reads (mnist_lit.engine.Engine's docstring).
        self.optimizer_factory, self.schedule_factory = optimizer, lr_scheduler
        self.schedule_interval, self.schedule_monitor = lr_scheduler_interval, lr_scheduler_monitor
        self.finished_schedule, self.steps_per_training_step = finished_schedule, steps_per_training_step
        self.label_smoothing = label_smoothing
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net_forward(x)  # (B, 784) -> (B, 10) logits

    def setup(self, stage: str) -> None:
        if self.label_smoothing and type(self).loss is not MNISTClassifier.loss:  # before any step of any stage
            raise MisconfigurationException(
                f"--model.label_smoothing is {self.label_smoothing}, but {type(self).__name__} writes a loss() of its "
                "own, which this option does not reach. Leave --model.label_smoothing at 0, or smooth the targets "
                "inside that loss.")
        if self.hparams.compile:  # compile the bound forward, not the module: state_dict keys stay unprefixed
            self.net_forward = torch.compile(self.net.forward)

    # -- the science: one loss, one step, for training, validation and test ------------------------------

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of (B, 10) logits against (B,) class indices: cross-entropy (softmax is inside it)."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)  # (B, 784) -> (B, 10)
        return self.loss(logits, y), logits, y

    # -- metrics ----------------------------------------------------------------------------------------

    def log_training_epoch(self, logits, targets, losses: torch.Tensor, sizes: list[int]) -> None:
        """The epoch's train/loss_epoch (sample-weighted) and train/acc, from every SGD step's outputs."""
        self.train_loss.update(losses, weight=torch.tensor(sizes, device=losses.device))
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=1)  # metric objects:
        if logits is not None:  # None: a training_step of the subclass's own, which returns its loss only
            self.train_acc.update(logits.argmax(1), targets)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=1)  # batch_size unused

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        loss, logits, y = self.model_step(batch)
        accuracy, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        accuracy.update(logits, y)
        mean_loss.update(loss, weight=len(y))
        # Metric objects: Lightning computes, syncs across ranks and resets them at epoch end.
        self.log(f"{stage}/loss", mean_loss, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=stage == "val")
        return logits  # (B, 10), for callbacks (report.py: confusion matrix, misclassified digits)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        # Not after the sanity check (a check of the code, not a result), nor when a validation_step of a subclass's
        # own counted nothing into val_acc (its best would read 0).
        if self.trainer.sanity_checking or self.val_acc.update_count == 0:
            return
        self.val_acc_best.update(self.val_acc.compute())
        # Computed from the synced val/acc, so equal on every rank: sync_dist only silences Lightning's warning.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.evaluate(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = batch
        return self(x).softmax(dim=1)  # (B, 10) class probabilities


def network(module: nn.Module) -> nn.Module:
    """What maps pixels to logits in a trained module: an MNISTClassifier's ``net`` (its forward is just that),
    any other module itself."""
    return module.net if type(module).forward is MNISTClassifier.forward else module
