"""Per-example results: every evaluation on labelled data writes each example's label, predicted class and class
probabilities into the run folder, with the identity of the examples, so that two runs can be paired example by
example rather than compared by their accuracies alone.

    python -m mnist_lit fit --config configs/default.yaml      # <run>/per_example/{val,test}.csv and .json
    python -m mnist_lit test --ckpt_path <run>/checkpoints/last.ckpt   # <run>/test/version_K/per_example/test.csv

``<split>.csv``: ``row, label, predicted, p_0 ... p_{C-1}``, one line per example in the order evaluated.
``<split>.json``: which examples those are (the data module's class, the data set, the split, the number of rows,
and a SHA-256 of the inputs and labels (int64) in that order: MNISTDataModule's raw uint8 split, so that it does not
depend on the normalization; another module's inputs as served), and when (epoch, step, checkpoint). Two runs whose
digests match evaluated the same examples in the same order. ``val`` is the validation at the best epoch
(``val/acc`` at ``val/acc_best`` and above every earlier epoch, as the best checkpoint is chosen; kept in memory and
written once, when training ends); ``test`` is the test pass. Under several processes each rank would see its own
shard, so the files step aside there, with one notice. What it costs: scripts/measure/per_example_cost.py.
"""

from __future__ import annotations

import csv
import hashlib
import json

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from mnist_lit.data import MNISTDataModule
from mnist_lit.runs import run_folder


def digest(*tensors: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class PerExample(L.Callback):
    """Collects (probabilities, labels) of every validation and test batch whose step returned (B, C) logits of an
    (inputs, labels) batch, and writes them as ``per_example/<split>.csv`` with ``<split>.json`` beside."""

    def __init__(self):
        self.parts: dict[str, list] = {}
        self.best_val: tuple | None = None  # (parts, epoch, step, input digest) of the best validation so far
        self.best_score: float | None = None
        self.inputs: dict[str, hashlib._Hash] = {}
        self.stepped_aside = False

    def __getstate__(self) -> dict:
        # A hash under way cannot be pickled or copied (ddp_spawn pickles the callbacks, StochasticWeightAveraging
        # copies the module with its trainer): a copy starts its evaluations afresh.
        return {**self.__dict__, "parts": {}, "inputs": {}}

    def start(self, stage: str) -> None:
        self.parts[stage], self.inputs[stage] = [], hashlib.sha256()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.start("val")

    def on_test_epoch_start(self, trainer, pl_module):
        self.start("test")

    def collect(self, trainer, stage: str, outputs, batch) -> None:
        if trainer.sanity_checking or stage not in self.parts:
            return
        fits = (torch.is_tensor(outputs) and outputs.dim() == 2 and isinstance(batch, (tuple, list))
                and len(batch) == 2 and torch.is_tensor(batch[1]) and len(batch[1]) == len(outputs))
        if not fits:
            self.parts.pop(stage)  # not (B, C) logits of (inputs, labels): nothing to pair
            return
        x, y = batch
        self.parts[stage].append((outputs.detach().float().softmax(dim=1).cpu(), y.detach().cpu()))
        if not isinstance(trainer.datamodule, MNISTDataModule) and stage in self.inputs:
            self.inputs[stage].update(x.detach().cpu().contiguous().numpy().tobytes())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.collect(trainer, "val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.collect(trainer, "test", outputs, batch)

    def on_validation_end(self, trainer, pl_module):
        metrics, parts = trainer.callback_metrics, self.parts.pop("val", None)
        if not parts or trainer.sanity_checking:
            return
        now = (parts, trainer.current_epoch, trainer.global_step, self.inputs["val"].digest())
        if trainer.state.fn == TrainerFn.VALIDATING:  # validate: its one evaluation is the result
            self.write(trainer, "val", *now)
            return
        score, best = metrics.get("val/acc"), metrics.get("val/acc_best")  # best: restored on a resume
        above = self.best_score is None or (score is not None and score > self.best_score)
        if score is None or ((best is None or score >= best) and above):  # the first epoch of the best score,
            self.best_val, self.best_score = now, None if score is None else float(score)  # as the checkpoint's

    def on_train_end(self, trainer, pl_module):
        if self.best_val:
            self.write(trainer, "val", *self.best_val)

    def on_test_end(self, trainer, pl_module):
        parts = self.parts.pop("test", None)
        if parts:
            self.write(trainer, "test", parts, trainer.current_epoch, trainer.global_step, self.inputs["test"].digest())

    def write(self, trainer: L.Trainer, stage: str, parts: list, epoch: int, step: int, inputs: bytes) -> None:
        if trainer.world_size > 1:
            if not self.stepped_aside:
                self.stepped_aside = True
                rank_zero_info("mnist_lit: per_example/*.csv steps aside under several processes (each rank "
                               "evaluates a shard); evaluate the checkpoint in one process to get them.")
            return
        folder = run_folder(trainer)
        if folder is None:
            return
        probabilities, labels = (torch.cat(t) for t in zip(*parts, strict=True))
        data = trainer.datamodule
        if isinstance(data, MNISTDataModule) and stage in data.splits:
            images, split_labels = data.splits[stage]  # served in order: the first rows, if limit_*_batches cut it
            n = len(labels)
            identity = {"dataset": data.dataset.title, "digest": digest(images[:n], split_labels[:n].long())}
        else:
            identity = {"dataset": None, "digest": hashlib.sha256(inputs + labels.long().numpy().tobytes()).hexdigest()}
        out = folder / "per_example"
        out.mkdir(parents=True, exist_ok=True)
        predicted = probabilities.argmax(dim=1)
        with (out / f"{stage}.csv").open("w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["row", "label", "predicted", *(f"p_{c}" for c in range(probabilities.shape[1]))])
            for row, (label, guess, p) in enumerate(zip(labels.tolist(), predicted.tolist(),
                                                        probabilities.tolist(), strict=True)):
                rows.writerow([row, label, guess, *(f"{v:.6g}" for v in p)])
        record = {"data_module": f"{type(data).__module__}.{type(data).__qualname__}" if data else None,
                  **identity, "split": stage, "rows": len(labels), "classes": probabilities.shape[1],
                  "accuracy": (predicted == labels).float().mean().item(), "epoch": epoch, "global_step": step,
                  "checkpoint": trainer.ckpt_path}
        (out / f"{stage}.json").write_text(json.dumps(record, indent=1) + "\n")
