"""The fast path is exact: mnist_lit's weights equal, bit for bit (CPU, float32, same seed, same batches),
those of Lightning's own automatic loop with a plain ``training_step(batch)`` and those of the plain PyTorch
loop in scripts/measure/plain_loop.py, over 315 SGD steps of the cosine schedule, with clipping and accumulation."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from research_modules import SMOOTHING

from conftest import REPO, fit_args, only_run
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule
from mnist_lit.denormals import set_flush_denormal
from mnist_lit.export import from_checkpoint
from mnist_lit.model import MLP

EPOCHS, BATCH = 5, 8  # tiny_mnist: 500 training rows at batch 8 = 63 batches an epoch (the last of 4), 315 in all
TRAINER = {"clip_val": None, "clip_algorithm": "norm", "accumulate": 1}


class PlainLightning(L.LightningModule):
    """Lightning's documented way: automatic optimization, one batch per ``training_step``, the loss returned."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.net, self.label_smoothing = MLP(), label_smoothing

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def mnist_lit_weights(data: Path, logs: Path, clip_val=None, clip_algorithm="norm", accumulate=1,
                      *extra: str) -> tuple[list[torch.Tensor], str]:
    args = ["--trainer.max_epochs", str(EPOCHS), "--test_after_fit", "false", "--torch_threads", "1",
            "--data.batch_size", str(BATCH), "--trainer.check_val_every_n_epoch", str(EPOCHS),
            "--trainer.accumulate_grad_batches", str(accumulate), *extra]
    if clip_val is not None:
        args += ["--trainer.gradient_clip_val", str(clip_val), "--trainer.gradient_clip_algorithm", clip_algorithm]
    cli = main(fit_args(data, logs, *args))
    state = torch.load(only_run(logs) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    path = "lightning" if cli.model.automatic_optimization else "fast"
    return [t for name, t in state.items() if name.startswith("net.")], path


def lightning_weights(data: Path, clip_val=None, clip_algorithm="norm", accumulate=1,
                      label_smoothing=0.0, callbacks=()) -> list[torch.Tensor]:
    torch.set_num_threads(1)
    set_flush_denormal(True)  # as mnist_lit's fit and the plain loop do by default: the same arithmetic in all three
    L.seed_everything(0)
    model = PlainLightning(label_smoothing)
    trainer = L.Trainer(max_epochs=EPOCHS, gradient_clip_val=clip_val, gradient_clip_algorithm=clip_algorithm,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=list(callbacks))
    trainer.fit(model, MNISTDataModule(data_dir=str(data), verify_checksums=False, val_size=100, batch_size=BATCH))
    return [p.detach() for p in model.net.parameters()]


PLAIN_DEFAULTS = {"clip_val": None, "clip_algorithm": "norm", "accumulate": 1, "label_smoothing": 0.0}
# Every setting this file compares the plain loop with: the first comparison on a data set runs them all in one
# process, which imports torch (and neither Lightning nor mnist_lit) once.
PLAIN_SETTINGS = [{}, {"clip_val": 0.5}, {"clip_val": 0.01, "clip_algorithm": "value"}, {"accumulate": 2},
                  {"clip_val": 0.5, "accumulate": 2}, {"label_smoothing": SMOOTHING}]
PLAIN_RUNS: dict[tuple, list[torch.Tensor]] = {}  # this file's plain-loop runs, by their data's bytes and settings


def plain_loop_weights(data: Path, folder: Path, **setting) -> list[torch.Tensor]:
    """The plain loop's weights with this setting (PLAIN_DEFAULTS' keys), from a process of its own that also ran
    the other PLAIN_SETTINGS on the same bytes (every test's tiny_mnist is the same data), each run once."""
    files = sorted((data / "MNIST" / "raw").glob("*.gz"))  # their content: gzip's header holds the time of writing
    digest = hashlib.sha256(b"".join(gzip.decompress(f.read_bytes()) for f in files)).hexdigest()

    def key(s: dict) -> tuple:
        return digest, *sorted({**PLAIN_DEFAULTS, **s}.items())

    if key(setting) not in PLAIN_RUNS:
        todo = {key(s): s for s in (setting, *PLAIN_SETTINGS) if key(s) not in PLAIN_RUNS}
        PLAIN_RUNS.update(zip(todo, run_plain_loops(data, folder, list(todo.values())), strict=True))
    return [t.clone() for t in PLAIN_RUNS[key(setting)]]


def run_plain_loops(data: Path, folder: Path, settings: list[dict]) -> list[list[torch.Tensor]]:
    argvs = []
    for i, setting in enumerate(settings):
        s = {**PLAIN_DEFAULTS, **setting}
        argv = ["--data-dir", str(data), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--val-size", "100",
                "--threads", "1", "--accumulate", str(s["accumulate"]), "--clip-algorithm", s["clip_algorithm"],
                "--label-smoothing", str(s["label_smoothing"]), "--save", str(folder / f"plain{i}.pt")]
        argvs.append(argv + (["--clip-val", str(s["clip_val"])] if s["clip_val"] is not None else []))
    runs = "import json, sys, plain_loop\nfor argv in json.loads(sys.argv[1]): plain_loop.main(argv)"
    done = subprocess.run([sys.executable, "-c", runs, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, cwd=REPO / "scripts" / "measure")
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(folder / f"plain{i}.pt", weights_only=True) for i in range(len(settings))]


def assert_identical(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> None:
    assert len(ours) == len(theirs) == 6
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"{what}: parameter {i} differs by up to {(a - b).abs().max().item():.3g}"


SLOW = pytest.mark.slow  # the fast subset keeps "plain": a broken fast step fails it


@pytest.mark.parametrize("trainer, path", [
    ({}, "fast"),
    pytest.param({"clip_val": 0.5, "clip_algorithm": "norm"}, "lightning", marks=SLOW),
    pytest.param({"clip_val": 0.01, "clip_algorithm": "value"}, "lightning", marks=SLOW),
    pytest.param({"accumulate": 2}, "lightning", marks=SLOW),
    pytest.param({"clip_val": 0.5, "clip_algorithm": "norm", "accumulate": 2}, "lightning", marks=SLOW),
], ids=["plain", "clip-norm", "clip-value", "accumulate-2", "clip-norm-accumulate-2"])
def test_weights_equal_lightnings_loop_and_the_plain_loop(tiny_mnist: Path, tmp_path: Path, trainer: dict, path: str):
    ours, used = mnist_lit_weights(tiny_mnist, tmp_path / "logs", **trainer)
    assert used == path  # clipping and accumulation are Lightning's own: that fit switches to its loop
    assert_identical(ours, lightning_weights(tiny_mnist, **trainer), "mnist_lit vs Lightning's automatic loop")
    assert_identical(ours, plain_loop_weights(tiny_mnist, tmp_path, **trainer), "mnist_lit vs plain loop")
    if trainer:  # the setting did change the training: this comparison could have failed
        default = plain_loop_weights(tiny_mnist, tmp_path)
        assert not all(torch.equal(a, b) for a, b in zip(ours, default, strict=True))


@pytest.mark.slow
def test_an_average_of_the_weights_keeps_the_fast_path_and_equals_lightnings_callback(tiny_mnist: Path,
                                                                                     tmp_path: Path):
    # Lightning's EMAWeightAveraging, updated after every SGD step (from step 100 on, every 2nd) on the fast path,
    # gives the same average as the same callback on Lightning's documented loop; the checkpoint holds the average
    # as its weights (what test, predict and export read) and the trained weights, untouched by the averaging.
    ema = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.9",
           "--trainer.callbacks.update_every_n_steps", "2", "--trainer.callbacks.update_starting_at_step", "100"]
    averaged, used = mnist_lit_weights(tiny_mnist, tmp_path / "logs", None, "norm", 1, *ema)
    assert used == "fast"
    reference = EMAWeightAveraging(decay=0.9, update_every_n_steps=2, update_starting_at_step=100)
    assert_identical(averaged, lightning_weights(tiny_mnist, callbacks=[reference]), "EMA vs Lightning's callback")
    last = only_run(tmp_path / "logs") / "checkpoints" / "last.ckpt"
    trained = [t for name, t in torch.load(last, weights_only=True)["current_model_state"].items()
               if name.startswith("net.")]
    assert_identical(trained, plain_loop_weights(tiny_mnist, tmp_path), "trained weights vs plain loop")
    assert not any(torch.equal(a, b) for a, b in zip(averaged, trained, strict=True))  # the average is another point
    exported = [p.detach() for p in from_checkpoint(str(last)).net.parameters()]
    assert_identical(exported, averaged, "export of the checkpoint vs its average")


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    # The fast path runs its steps inside Lightning's autocast context, backward included; Lightning's loop runs
    # backward outside it.
    ["--trainer.precision", "bf16-mixed"],
    # Dropout draws from torch's generator in each forward pass: both loops draw the same masks in the same order.
    ["--model.net.init_args.dropout", "0.3", "--model.net.init_args.input_dropout", "0.1"],
], ids=["bf16-mixed", "dropout"])
def test_an_option_that_changes_the_arithmetic_gives_the_same_weights_on_both_loops(tiny_mnist: Path,
                                                                                    tmp_path: Path, option: list):
    fast, used = mnist_lit_weights(tiny_mnist, tmp_path / "fast", None, "norm", 1, *option)
    one, one_used = mnist_lit_weights(tiny_mnist, tmp_path / "one", None, "norm", 1, *option,
                                      "--model.steps_per_training_step", "1")
    assert (used, one_used) == ("fast", "lightning")
    assert_identical(fast, one, f"{' '.join(option)}: the fast path vs Lightning's loop")
    without = plain_loop_weights(tiny_mnist, tmp_path)  # the option did change the weights
    assert not any(torch.equal(a, b) for a, b in zip(fast, without, strict=True))


@pytest.mark.slow
def test_label_smoothing_is_cross_entropys_own_on_the_fast_path(tiny_mnist: Path, tmp_path: Path):
    ours, used = mnist_lit_weights(tiny_mnist, tmp_path / "logs", None, "norm", 1,
                                   "--model.label_smoothing", str(SMOOTHING))
    assert used == "fast"
    assert_identical(ours, plain_loop_weights(tiny_mnist, tmp_path, label_smoothing=SMOOTHING),
                     "--model.label_smoothing vs the plain loop's")


@pytest.mark.slow
def test_the_fast_path_is_exact_when_calls_do_not_divide_the_epoch(tiny_mnist: Path, tmp_path: Path):
    # 63 batches an epoch in calls of 5, ..., 5 and 3; and Lightning's loop chosen with steps_per_training_step 1.
    five, path = mnist_lit_weights(tiny_mnist, tmp_path / "five", None, "norm", 1,
                                   "--model.steps_per_training_step", "5")
    one, one_path = mnist_lit_weights(tiny_mnist, tmp_path / "one", None, "norm", 1,
                                      "--model.steps_per_training_step", "1")
    assert (path, one_path) == ("fast", "lightning")
    assert_identical(five, one, "5 steps per call vs Lightning's loop")
    assert_identical(five, plain_loop_weights(tiny_mnist, tmp_path), "5 steps per call vs plain loop")


@pytest.mark.slow
@pytest.mark.parametrize("steps, path", [("16", "fast"), ("1", "lightning")])
def test_a_subclass_with_a_loss_of_its_own_is_exact_on_both_loops(tiny_mnist: Path, tmp_path: Path, steps: str,
                                                                   path: str):
    # research_modules.LabelSmoothing overrides only loss(): the fast path, Lightning's loop (its training_step),
    # Lightning's documented loop and the plain loop with the same loss give the same weights, bit for bit.
    ours, used = mnist_lit_weights(tiny_mnist, tmp_path / "logs", None, "norm", 1, "--model",
                                   "research_modules.LabelSmoothing", "--model.steps_per_training_step", steps)
    assert used == path
    assert_identical(ours, lightning_weights(tiny_mnist, label_smoothing=SMOOTHING), "loss subclass vs Lightning")
    assert_identical(ours, plain_loop_weights(tiny_mnist, tmp_path, label_smoothing=SMOOTHING),
                     "loss subclass vs plain loop")
    cross_entropy = plain_loop_weights(tiny_mnist, tmp_path)  # the template's loss: other weights
    assert not any(torch.equal(a, b) for a, b in zip(ours, cross_entropy, strict=True))


@pytest.mark.parametrize("module", [[], ["--model", "bench_probe.LabelSmoothing"]])
def test_the_plain_loop_beside_a_fit_follows_its_weights(tiny_mnist: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, module: list[str]):
    # scripts/measure/call_length.py times the fast path against bench_probe.PlainBeside, a plain loop trained in the
    # same process after each epoch on a copy of the network: the two time the same arithmetic only if the copy
    # ends where the fit ends, bit for bit (the default call length: one call an epoch here), also
    # beside a subclass with a loss of its own (label smoothing: the plain loop uses the module's loss).
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "measure"))
    monkeypatch.setenv("BENCHMARK_PROBE_OUT", str(tmp_path / "probe.json"))
    cli = main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3", "--test_after_fit", "false",
                        "--data.batch_size", "8", "--trainer.limit_val_batches", "0",
                        "--trainer.callbacks+=bench_probe.PlainBeside", *module))
    beside = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PlainBeside")
    assert not cli.model.automatic_optimization and cli.trainer.global_step == 3 * 63
    assert_identical(list(cli.model.net.parameters()), list(beside.net.parameters()), "fit vs plain loop beside it")
    assert len(beside.plain_s) == len(beside.fast_s) == 3
