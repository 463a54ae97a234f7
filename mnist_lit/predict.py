"""What ``predict`` writes: ``predictions.csv`` (path, predicted class, its probability, the probability of
every class) and a table on stdout.

    python -m mnist_lit predict --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt --data.predict_images 'my/*.png'

The pictures themselves are read and prepared by ``mnist_lit.images`` (through the data module).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(L.Callback):
    """After ``predict``: ``predictions.csv`` in the run folder (or ``output``) and a table on stdout.

    One row per input: its name (the file, or ``t10k/<index>`` without --data.predict_images), the
    true label where known, the predicted class, its probability and every class's probability.

    Args:
        output: where to write the CSV; None means ``<run folder>/predictions.csv``. Under several
            devices each rank writes its own rows to ``...-rank<N>.csv``.
        table_rows: rows printed as a table (the CSV always holds all of them).
    """

    def __init__(self, output: str | None = None, table_rows: int = 50):
        self.output, self.table_rows = output, table_rows
        self.stepped_aside: str | None = None  # what a predict_step returned instead of probabilities
        self.rows: list[torch.Tensor] = []
        self.probabilities: list[torch.Tensor] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.probabilities, self.stepped_aside = [], [], None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        names = getattr(trainer.datamodule, "classes", ())  # class names: MNISTDataModule's, or a module's own
        classes = len(names) if isinstance(names, (list, tuple)) else -1
        if not (isinstance(outputs, torch.Tensor) and outputs.shape == (len(batch[1]), classes)):
            self.stepped_aside = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else \
                f"a tensor of shape {tuple(outputs.shape)}"
            return
        self.rows.append(batch[1].cpu())  # MNISTDataModule's predict batches carry row numbers
        self.probabilities.append(outputs.float().cpu())

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stepped_aside:
            rank_zero_info(f"mnist_lit: predictions.csv steps aside: {type(pl_module).__name__}.predict_step returns "
                           f"{self.stepped_aside}, not (images, classes) probabilities.")
            return
        data = trainer.datamodule
        names, labels, classes = data.predict_names, data.predict_labels, data.classes
        rows, probabilities = torch.cat(self.rows).tolist(), torch.cat(self.probabilities)
        best_probabilities, best_classes = (t.tolist() for t in probabilities.max(dim=1))
        path = Path(self.output or Path(trainer.log_dir or ".") / "predictions.csv")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        table = []
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["path", "label", "predicted", "probability", *(f"p_{c}" for c in classes)])
            for row, p, top, best in zip(rows, probabilities.tolist(), best_probabilities, best_classes, strict=True):
                label = classes[labels[row]] if labels is not None else ""
                out.writerow([names[row], label, classes[best], f"{top:.6f}", *(f"{v:.6f}" for v in p)])
                table.append((names[row], classes[best], f"{top:.3f}"))
        self.print_table(table, len(rows))
        print(f"Predictions for {len(rows)} images: {path}", file=sys.stderr)

    def print_table(self, table: list[tuple[str, str, str]], total: int) -> None:
        shown = [("image", "predicted", "probability"), *table[: self.table_rows]]
        widths = [max(len(r[i]) for r in shown) for i in range(3)]
        for i, row in enumerate(shown):
            print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}")
            if i == 0:
                print("  ".join("-" * w for w in widths))
        if total > self.table_rows:
            print(f"... and {total - self.table_rows} more in the CSV")
