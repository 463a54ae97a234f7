"""LightningModules as researchers write them, chosen by --model in the tests (tests/test_own_modules.py).

Each records the loss it computed at every SGD step (``seen``), so that a test can check the curve that was
logged is the module's own. Label smoothing stands in for "a loss of one's own": its values differ from the
template's cross-entropy on the same logits, so a fit that quietly used the template's loss would show.
"""

import lightning as L
import torch
import torch.nn.functional as F

from mnist_lit.model import MLP, MNISTClassifier

SMOOTHING = 0.1


class LabelSmoothing(MNISTClassifier):
    """The one-method change: ``loss``. Keeps the fast path."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=SMOOTHING)


class OwnTrainingStep(MNISTClassifier):
    """Lightning's most common edit: a training_step of its own returning a label-smoothed loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=SMOOTHING)
        self.seen.append(loss.item())
        return loss


class OwnTrainingStepThatLogs(OwnTrainingStep):
    """The same, logging its loss itself, as Lightning's docs show."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


class ManualOptimization(MNISTClassifier):
    """Lightning's manual-optimization idiom: automatic_optimization = False and its own loop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=SMOOTHING)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler.step()
        self.log("train/loss", loss)
        self.seen.append(loss.item())


class ManualWithoutStep(MNISTClassifier):
    """automatic_optimization = False, but no training_step: the template's fast path trains it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False


class OwnOptimizers(MNISTClassifier):
    """Its own configure_optimizers: plain SGD halved every epoch, stepped by Lightning per its interval."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class OwnValidation(MNISTClassifier):
    """Its own validation_step, which logs val/acc itself and returns nothing."""

    def validation_step(self, batch, batch_idx):
        loss, logits, y = self.model_step(batch)
        self.log("val/acc", (logits.argmax(1) == y).float().mean())
        self.log("val/loss", loss)


class PerBatchHook(MNISTClassifier):
    """A per-batch hook of its own: Lightning must call it once per batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[int] = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.batches.append(batch_idx)


class EpochEndWithoutSuper(MNISTClassifier):
    """Overrides an engine hook and does not call super(): the engine's part (the per-epoch schedule) still runs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epochs_ended = 0

    def on_train_epoch_end(self):
        self.epochs_ended += 1


class Plain(L.LightningModule):
    """A LightningModule of one's own, not built on the template: a different shape of module."""

    def __init__(self, hidden: int = 32, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean())
        return logits

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)



class ClassPredictions(MNISTClassifier):
    """Its own predict_step that returns the predicted classes (B,), not probabilities (B, 10)."""

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(dim=1)
