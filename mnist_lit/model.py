"""The network and how it learns: an MLP on 784 pixels, SGD on cross-entropy, one metric object per stage.

    python -m mnist_lit fit --config configs/default.yaml --model.lr 0.05

``MLP`` is a plain ``nn.Module`` that returns logits; ``MNISTClassifier`` wraps any such
network (``model.net`` takes a ``class_path``) with the loss, the optimizer and the metrics.
Softmax appears only in ``predict_step``: the loss takes logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat, PositiveInt
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy


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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the likely fix."""


class MNISTClassifier(L.LightningModule):
    """A classifier trained with SGD on cross-entropy, logging ``{train,val,test}/{loss,acc}`` and ``val/acc_best``.

    Training runs several SGD steps per ``training_step`` call (it pulls batches from
    Lightning's ``dataloader_iter``): each step is an ordinary forward, backward and
    optimizer step on one batch, so the optimization is the same for any
    ``steps_per_training_step``; only Lightning's per-call overhead is shared.

    Args:
        net: the network, images (B, 784) -> logits (B, 10); None means ``MLP()``.
        lr: SGD learning rate (the peak, when a schedule is used).
        momentum: SGD momentum.
        nesterov: use Nesterov momentum.
        weight_decay: L2 penalty added by SGD.
        lr_schedule: ``cosine`` decays lr to 0 over all training steps, per step; ``constant`` keeps it.
        steps_per_training_step: SGD steps per Lightning ``training_step`` call. Under DDP it is 1,
            since DDP synchronizes gradients once per forward call.
        num_classes: number of classes the metrics count.
        compile: run the network through ``torch.compile`` (compiled when a fit, validate, test or
            predict starts; the first batches of each shape pay the compile time). Checkpoints are the
            same either way.
    """

    def __init__(self, net: nn.Module | None = None, lr: PositiveFloat = 0.1, momentum: float = 0.9,
                 nesterov: bool = True, weight_decay: float = 0.0,
                 lr_schedule: Literal["cosine", "constant"] = "cosine", steps_per_training_step: PositiveInt = 16,
                 num_classes: PositiveInt = 10, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # training_step runs its own SGD steps
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
        if self.hparams.compile:  # compile the bound forward, not the module: state_dict keys stay unprefixed
            self.net_forward = torch.compile(self.net.forward)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                    weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches  # SGD steps over the whole run
        if total_steps == float("inf"):
            raise ValueError("--model.lr_schedule cosine needs a finite run: set --trainer.max_epochs or "
                             "--trainer.max_steps, or use --model.lr_schedule constant.")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        distributed = self.trainer.world_size > 1
        self.steps_per_call = 1 if distributed else self.hparams.steps_per_training_step
        # Lightning's manual_backward runs its pre/post-backward hooks on every step (~0.3 ms each time,
        # a fifth of a small model's step). Only DDP (gradient sync set-up) and fp16 (loss scaling) need
        # them; otherwise call autograd directly. on_before/after_backward hooks do not fire on that path.
        needs_lightning = distributed or getattr(self.trainer.precision_plugin, "scaler", None) is not None
        self.run_backward = self.manual_backward if needs_lightning else torch.Tensor.backward

    def training_step(self, dataloader_iter: Iterator) -> None:  # the name asks Lightning for its iterator
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        losses, predictions, targets = [], [], []
        limit = self.trainer.num_training_batches  # < the loader's length under --trainer.limit_train_batches
        for _ in range(self.steps_per_call):
            if limit < dataloader_iter.length and dataloader_iter.fetched >= limit:
                break  # Lightning ends the epoch after `limit` calls; the ones past the limit are empty
            try:
                (x, y), _, _ = next(dataloader_iter)
            except StopIteration:  # the epoch's last call may hold fewer batches
                break
            x, y = x.to(self.device), y.to(self.device)  # no-op for MNISTDataModule, whose data lives there
            logits = self(x)  # (B, 784) -> (B, 10)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            self.run_backward(loss)
            optimizer.step()  # Lightning's optimizer: counts global_step, steps the fp16 scaler
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
            predictions.append(logits.detach().argmax(1))
            targets.append(y)
        if losses and not torch.isfinite(torch.stack(losses)).all():  # one device sync per call
            bad = next(i for i, loss in enumerate(losses) if not torch.isfinite(loss))
            raise TrainingDiverged(
                f"The training loss became {losses[bad].item()} at SGD step {self.global_step - len(losses) + bad} "
                f"(epoch {self.current_epoch}, lr {optimizer.param_groups[0]['lr']:.3g}); training stopped and no "
                "checkpoint was written from it. The learning rate is most likely too high for this network and "
                "batch size: lower --model.lr (0.1 is the tested default; try 10x lower), or resume from the "
                "last good checkpoint (checkpoints/last.ckpt of this run) with a lower lr.")
        # Lightning counts one logging step per call; count SGD steps instead, so that TensorBoard's x-axis
        # and log_every_n_steps mean optimizer steps for any steps_per_training_step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(losses) - 1
        if losses:  # metric update and logging once per call, not per SGD step: each costs ~0.3-1 ms
            losses = torch.stack(losses)  # (steps,) one loss per SGD step
            self.train_acc.update(torch.cat(predictions), torch.cat(targets))
            self.train_loss.update(losses)
            samples = sum(len(t) for t in targets)  # Lightning asks for it under dataloader_iter
            self.log("train/loss", losses.mean(), on_step=True, on_epoch=False, prog_bar=True, logger=False,
                     batch_size=samples)
            self.log_step_curves(losses, optimizer.param_groups[0]["lr"])
            self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=samples)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=samples)

    def log_step_curves(self, losses: torch.Tensor, lr: float) -> None:
        """train/loss and train/lr every log_every_n_steps SGD steps, straight to the logger (rank 0).

        Lightning's own step filter tests (step + 1) % n == 0 once per training_step call, which
        misses most multiples when a call advances several steps.
        """
        every, step = self.trainer.log_every_n_steps, self.global_step
        if self.logger is None or not self.trainer.is_global_zero or step // every == (step - len(losses)) // every:
            return
        self.logger.log_metrics({"train/loss": losses.mean().item(), "train/lr": lr}, step=step - 1)

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
