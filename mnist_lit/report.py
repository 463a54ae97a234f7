"""What a run shows in TensorBoard beyond the module's loss, accuracy and learning rate: throughput,
digits, confusion matrices and per-class accuracy.

    python -m mnist_lit fit --config configs/default.yaml --report.histograms true
    tensorboard --logdir logs

Everything is written by rank 0 only; the confusion matrices are torchmetrics objects, computed
(synced) on every rank. The scalars (throughput, per-class accuracy) go to every logger; the pictures
need a TensorBoardLogger and step aside, with one notice, under other loggers. Their cost is part of
the whole-process figures in docs/benchmarks.md.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw, ImageFont
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

STAGES = ("val", "test")
STEP_METHODS = {"val": "validation_step", "test": "test_step"}  # the LightningModule's method behind each stage


class TensorBoardReport(L.Callback):
    """Adds to each TensorBoard run: ``train/samples_per_s``, an input-digit grid,
    misclassified validation digits, confusion matrices and per-class accuracy (``--report.*``).

    Args:
        misclassified: misclassified validation digits shown per epoch, captioned predicted/true (0: none).
        histograms: weight histograms after each training epoch, gradients of its first step.
    """

    def __init__(self, misclassified: NonNegativeInt = 32, histograms: bool = False):
        self.misclassified, self.histograms = misclassified, histograms
        self.confusion: dict[str, MulticlassConfusionMatrix] = {}
        self.inputs_logged, self.epoch_started, self.wrong, self.gradients_pending = False, None, [], False
        self.noticed = False  # the notice that the pictures need a TensorBoardLogger
        self.stepped_aside: set[str] = set()  # stages whose steps return no logits: noticed once

    def writer(self, trainer: L.Trainer):
        """TensorBoard's SummaryWriter on rank 0, else None (no TensorBoard logger, another rank)."""
        if not trainer.is_global_zero:
            return None
        return next((logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)

    def setup(self, trainer, pl_module, stage):
        if trainer.loggers and self.writer(trainer) is None and trainer.is_global_zero and not self.noticed \
                and not trainer.fast_dev_run:  # fast_dev_run swaps every logger for a DummyLogger
            self.noticed = True  # once per run, not again for fit's test pass
            names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
            rank_zero_info(f"mnist_lit: the TensorBoard pictures (digits, confusion matrices) need a TensorBoardLogger;"
                           f" this run logs to {names}, which get the scalars only.")
        self.confusion = {}  # per stage, made at its first batch: as many classes as the logits have

    # -- training: throughput and histograms ------------------------------------------------------

    @staticmethod
    def now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per epoch edge, not per step
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_started = self.now(pl_module)
        self.gradients_pending = self.histograms

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        writer = self.writer(trainer) if self.gradients_pending else None
        if writer is not None:  # the first step of each epoch: gradients exist only inside the step
            for name, param in pl_module.named_parameters():
                if param.grad is not None:
                    writer.add_histogram(f"gradients/{name}", param.grad, trainer.global_step)
        self.gradients_pending = False

    def end_training_time(self, trainer, pl_module) -> None:
        """Samples/s over the epoch's training steps only (validation runs before on_train_epoch_end)."""
        if self.epoch_started is None:
            return
        seconds, self.epoch_started = self.now(pl_module) - self.epoch_started, None
        loader = trainer.train_dataloader
        rows = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
        batch_size = getattr(loader, "batch_size", None) or rows
        samples = min(rows, trainer.num_training_batches * batch_size) * trainer.world_size
        # All ranks' samples over this rank's seconds; sync_dist averages the ranks' views.
        pl_module.log("train/samples_per_s", samples / seconds, on_step=False, on_epoch=True, batch_size=1,
                      sync_dist=True)

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.training and not trainer.sanity_checking:
            self.end_training_time(trainer, pl_module)
        self.wrong = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.end_training_time(trainer, pl_module)  # when no validation ran this epoch
        writer = self.writer(trainer)
        if self.histograms and writer is not None:
            for name, param in pl_module.named_parameters():
                writer.add_histogram(f"weights/{name}", param, trainer.global_step)

    # -- evaluation: digits, confusion matrix, per-class accuracy ------------------------------------

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.evaluated(trainer, "val", outputs, batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.evaluated(trainer, "test", outputs, batch, batch_idx)

    def evaluated(self, trainer, stage: str, logits, batch, batch_idx: int) -> None:
        if trainer.sanity_checking or not self.are_logits(trainer, stage, logits, batch):
            return
        x, y = batch
        predicted = logits.argmax(1)
        if stage not in self.confusion:
            self.confusion[stage] = MulticlassConfusionMatrix(logits.shape[1], validate_args=False).to(logits.device)
        self.confusion[stage].update(predicted, y)
        writer = self.writer(trainer)
        if writer is None:
            return
        if x[0].numel() != 28 * 28:  # another data module's inputs: the counts above, no pictures
            if "pictures" not in self.stepped_aside:
                self.stepped_aside.add("pictures")
                rank_zero_info(f"mnist_lit: the input and misclassified pictures step aside: the inputs are "
                               f"{tuple(x.shape[1:])}, not 28x28 images (the confusion matrices stay).")
            return
        if not self.inputs_logged and batch_idx == 0:  # once per run: what the network is fed
            writer.add_image(f"{stage}/inputs", make_grid(digits(x[:64]), nrow=8, normalize=True), 0)
            self.inputs_logged = True
        room = self.misclassified - sum(len(w[0]) for w in self.wrong)
        wrong = (predicted != y).nonzero().flatten()[:room] if stage == "val" and room > 0 else []
        if len(wrong):
            self.wrong.append((digits(x[wrong]).cpu(), predicted[wrong].cpu(), y[wrong].cpu()))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.evaluation_done(trainer, pl_module, "val")
        writer = self.writer(trainer)
        if writer is not None and self.wrong:
            images, predicted, true = (torch.cat(parts) for parts in zip(*self.wrong, strict=True))
            writer.add_image("val/misclassified", misclassified_image(images, predicted, true), trainer.global_step)

    def on_test_epoch_end(self, trainer, pl_module):
        self.evaluation_done(trainer, pl_module, "test")

    def are_logits(self, trainer, stage: str, outputs, batch) -> bool:
        """Whether a validation_step / test_step returned (B, C) logits of an (images, labels) batch, as
        MNISTClassifier's do; a module's own steps that return something else get one notice, no pictures."""
        fits = (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and isinstance(batch, (tuple, list))
                and len(batch) == 2 and len(batch[1]) == len(outputs))
        if not fits and stage not in self.stepped_aside:
            self.stepped_aside.add(stage)
            rank_zero_info(f"mnist_lit: the {stage} digits, confusion matrix and per-class accuracy step aside: "
                           f"{type(trainer.lightning_module).__name__}.{STEP_METHODS[stage]} returns "
                           f"{type(outputs).__name__}, not (B, classes) logits of an (images, labels) batch.")
        return fits

    def evaluation_done(self, trainer, pl_module, stage: str) -> None:
        if stage not in self.confusion:  # nothing was counted (no batch, or not logits)
            return
        matrix = self.confusion[stage].compute()  # (true, predicted) counts, synced over ranks
        self.confusion[stage].reset()
        per_class = matrix.diag() / matrix.sum(1).clamp(min=1)
        for digit, accuracy in enumerate(per_class.tolist()):
            pl_module.log(f"{stage}/acc_per_class/{digit}", accuracy, batch_size=1, sync_dist=True)  # equal on all
        writer = self.writer(trainer)
        if writer is not None:
            classes = getattr(trainer.datamodule, "classes", None)  # names, where the data module gives them
            if not isinstance(classes, (list, tuple)) or len(classes) != len(matrix):
                classes = [str(c) for c in range(len(matrix))]
            writer.add_image(f"{stage}/confusion_matrix", confusion_image(matrix.cpu(), classes), trainer.global_step)
            writer.add_text(f"{stage}/confusion_matrix", markdown_matrix(matrix.cpu()), trainer.global_step)


def digits(x: torch.Tensor) -> torch.Tensor:
    """(B, 784) or (B, 28, 28) -> (B, 1, 28, 28) images for display."""
    return x.detach().float().reshape(len(x), 1, 28, 28)


# The pictures are drawn with Pillow (torchvision's own image dependency) straight into uint8 tensors, in
# milliseconds: matplotlib spent ~0.1-0.2 s on each figure (two per validation, one for the test).
BLUES = torch.tensor([[247, 251, 255], [107, 174, 214], [8, 48, 107]], dtype=torch.float)  # light -> dark


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no font files needed


def misclassified_image(images: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor,
                        scale: int = 3) -> torch.Tensor:
    """(N, 1, 28, 28) digits -> one (3, H, W) uint8 image, 8 a row, each labelled 'predicted/true'."""
    columns, cell = 8, (28 + 2) * scale  # make_grid pads 2 px around each digit
    grid = make_grid(images, nrow=columns, normalize=True).mul(255).byte()  # (3, H, W)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # nearest-neighbour, readable pixels
    picture = to_pil_image(grid)
    draw, text = ImageDraw.Draw(picture), font(8 * scale)
    for i, (p, t) in enumerate(zip(predicted.tolist(), true.tolist(), strict=True)):
        draw.text(((i % columns) * cell + 3 * scale, (i // columns) * cell + scale), f"{p}/{t}",
                  fill=(255, 69, 0), font=text)  # orangered
    return pil_to_tensor(picture)


def confusion_image(matrix: torch.Tensor, classes: list[str], cell: int = 36) -> torch.Tensor:
    """(C, C) counts (true, predicted) -> (3, H, W) uint8: a heat map on a log scale, counts in the cells,
    each class's name and accuracy beside its row."""
    n = len(matrix)
    per_class = (matrix.diag() / matrix.sum(1).clamp(min=1)).tolist()
    names = [f"{name}  {a:.1%}" for name, a in zip(classes, per_class, strict=True)]
    counts, labels, title = font(11), font(12), font(13)
    left = 2 * 13 + 8 + int(max(labels.getlength(name) for name in names))  # the rotated title, then the names
    top, width, height = 8, left + n * cell + 8, 8 + n * cell + 44
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    shade = matrix.float().log1p() / max(matrix.float().log1p().max().item(), 1e-9)  # 0..1
    colours, dark = interpolate(BLUES, shade).tolist(), (shade > 0.6).tolist()  # (C, C, 3) RGB, (C, C)
    for t, row in enumerate(matrix.tolist()):
        y = top + t * cell
        draw.text((left - 6, y + cell / 2), names[t], fill="black", font=labels, anchor="rm")
        for p, count in enumerate(row):
            x = left + p * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(colours[t][p]))
            if count:
                draw.text((x + cell / 2, y + cell / 2), str(count), font=counts, anchor="mm",
                          fill="white" if dark[t][p] else "black")
    bottom = top + n * cell
    for p in range(n):
        draw.text((left + p * cell + cell / 2, bottom + 4), str(p), fill="black", font=labels, anchor="mt")
    draw.text((left + n * cell / 2, bottom + 24), "predicted class (label number)", fill="black", font=title,
              anchor="mt")
    side = Image.new("RGB", (n * cell, 2 * 13), "white")  # the y title, drawn flat, then turned
    ImageDraw.Draw(side).text((n * cell / 2, 13), "true class  (per-class accuracy)", fill="black", font=title,
                              anchor="mm")
    picture.paste(side.rotate(90, expand=True), (0, top))
    return pil_to_tensor(picture)


def interpolate(stops: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear colour map: x in [0, 1] (any shape) -> uint8 RGB (..., 3) between the stops."""
    position = x.clamp(0, 1) * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    return torch.lerp(stops[low], stops[low + 1], (position - low).unsqueeze(-1)).round().byte()


def markdown_matrix(matrix: torch.Tensor) -> str:
    header = "| true \\ predicted | " + " | ".join(map(str, range(len(matrix)))) + " |"
    rule = "|---" * (len(matrix) + 1) + "|"
    rows = [f"| {t} | " + " | ".join(map(str, row)) + " |" for t, row in enumerate(matrix.tolist())]
    return "\n".join([header, rule, *rows])
