"""A callback for benchmark.py: records when training starts and how long each training epoch takes.

Added to a run with ``--trainer.callbacks+=bench_probe.BenchmarkProbe`` (``scripts/`` on PYTHONPATH);
writes JSON to the file named by $BENCHMARK_PROBE_OUT when fit ends. Validation is not timed.
"""

import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from mnist_lit.model import MNISTClassifier


class LabelSmoothing(MNISTClassifier):
    """A subclass that overrides only the loss, for its own row: ``--model bench_probe.LabelSmoothing``.

    Args:
        smoothing: cross-entropy's label_smoothing (the plain loop's ``--label-smoothing`` beside it).
        **kwargs: ``MNISTClassifier``'s arguments.
    """

    def __init__(self, smoothing: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.smoothing = smoothing

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


class BenchmarkProbe(Callback):
    def __init__(self):
        self.first_step_unix, self.epoch_train_s, self.started = None, [], None

    @staticmethod
    def now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per epoch edge, not per step
        return time.perf_counter()

    # No per-batch hook: one would switch mnist_lit to Lightning's own loop (engine.Engine.one_step_reasons).
    def on_train_epoch_start(self, trainer, pl_module):
        self.first_step_unix = self.first_step_unix or time.time()  # the first step follows within microseconds
        self.started = self.now(pl_module)

    def stop(self, pl_module):
        if self.started is not None:
            self.epoch_train_s.append(self.now(pl_module) - self.started)
            self.started = None

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.stop(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.stop(pl_module)

    def on_fit_end(self, trainer, pl_module):
        val_acc = trainer.callback_metrics.get("val/acc")
        result = {"first_step_unix": self.first_step_unix, "epoch_train_s": self.epoch_train_s,
                  "val_acc": None if val_acc is None else float(val_acc), "device": str(pl_module.device)}
        with open(os.environ["BENCHMARK_PROBE_OUT"], "w") as f:
            json.dump(result, f)


class PlainBeside(Callback):
    """A plain PyTorch loop's epoch after each of the fit's training epochs, in the same process: a copy of the
    module's network, taken when training starts, trained on the same batches in the same order with the module's
    loss, an optimizer of its class and settings and the same per-step cosine schedule, so that its weights (and
    the time their tiny floats cost) follow the module's own. Both epochs are timed without validation; the pair
    is one side-by-side measurement, free of what differs between processes. For call_length.py
    (``--trainer.callbacks+=bench_probe.PlainBeside``); writes JSON to $BENCHMARK_PROBE_OUT when fit ends.
    """

    def __init__(self):
        self.fast_s, self.plain_s, self.started = [], [], None

    def on_train_start(self, trainer, pl_module):
        schedule = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        if type(schedule) is not torch.optim.lr_scheduler.CosineAnnealingLR:
            raise RuntimeError(f"PlainBeside steps a cosine schedule per SGD step, the default config's; this fit "
                               f"has {type(schedule).__name__}: run it with --model.lr_scheduler "
                               "torch.optim.lr_scheduler.CosineAnnealingLR.")
        optimizer = trainer.optimizers[0]
        self.net = copy.deepcopy(pl_module.net)
        self.optimizer = type(optimizer)(self.net.parameters(), **optimizer.defaults)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, schedule.T_max, schedule.eta_min)

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.fast_s.append(time.perf_counter() - self.started)
        batches = trainer.datamodule.train_dataloader()
        batches.sampler.set_epoch(trainer.current_epoch)
        net, optimizer, schedule, loss = self.net, self.optimizer, self.schedule, pl_module.loss
        with torch.enable_grad():
            started = time.perf_counter()
            for x, y in batches:
                loss(net(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            self.plain_s.append(time.perf_counter() - started)

    def on_fit_end(self, trainer, pl_module):
        with open(os.environ["BENCHMARK_PROBE_OUT"], "w") as f:
            json.dump({"fast_s": self.fast_s, "plain_s": self.plain_s}, f)
