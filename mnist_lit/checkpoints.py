"""Checkpoints: checked before use (and never unpickled into code), written when a run is interrupted, and
every problem with one ends in a paragraph naming the fix.

    python -m mnist_lit fit --config configs/default.yaml --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt

Lightning already writes each checkpoint to a temporary file and moves it into place (fsspec
transaction), so a write that fails part-way leaves the previous checkpoint intact; a test checks it.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from mnist_lit.trust import check_imports

SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # resolved by Lightning itself
DEFAULT_MODEL = "mnist_lit.model.MNISTClassifier"  # --model's default, and the class of checkpoints that name none
DEFAULT_DATA = "mnist_lit.data.MNISTDataModule"  # --data's, likewise


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one paragraph naming the file and the fix."""


def load_checkpoint(path: str) -> dict:
    """The checkpoint's contents, loaded as tensors and plain values only (``weights_only``): a file
    whose unpickling would run code is refused before anything in it runs."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass the path of a .ckpt file, e.g. "
                              "logs/mnist/version_N/checkpoints/last.ckpt (fit prints the best one when it ends).")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with general advice; the line that says what was found comes later.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith(("Weights only", "Check the doc", "Please",
                                                                          "(1)", "(2)", "WeightsUnpickler"))),
                      lines[0] if lines else "unpickling failed")
        if "GLOBAL" in detail or "global" in detail:
            raise CheckpointError(
                f"Refused to load {path}: it asks to import and run code while loading "
                f"({detail}), and mnist_lit loads checkpoints as tensors and plain "
                "values only, so nothing in it was executed. Checkpoints written by mnist_lit never need that: "
                "use one from a run you trust.") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail}): it is "
                              "damaged or not a PyTorch file. Use another checkpoint of the run, e.g. last.ckpt "
                              "beside it.") from None
    except Exception as err:  # arbitrary bytes fail in arbitrary ways (EOFError, IndexError, zip errors...)
        reason = str(err).splitlines()[0].strip() if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}): it is "
                              "truncated or damaged. Use another checkpoint of the run, e.g. last.ckpt beside "
                              "it.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (it has no state_dict). "
                              "Pass a .ckpt written by mnist_lit's fit.")
    check_stored_config(checkpoint, path)
    return checkpoint


# A run's stored config has a few hundred entries; past these bounds it is refused before anything walks or parses it.
STORED_CONFIG_CHARS, STORED_CONFIG_NODES = 256_000, 100_000


def expanded_size(root, children) -> int:
    """How many nodes the tree under ``root`` has once every shared part is counted where it appears (what a YAML
    alias, or a pickled object referenced twice, expands to); a cycle raises RecursionError. Each distinct node is
    visited once, so a "billion laughs" costs what its text does, not what it expands to."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()  # the current node's ancestors: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children(node))
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            for child in children(node):
                if id(child) in on_path:
                    raise RecursionError("it contains itself")
                if id(child) not in sizes:
                    stack.append((child, False))
    return sizes[id(root)]


def yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def python_children(value) -> list:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return list(value) if isinstance(value, (list, tuple, set)) else []


def check_stored_config(checkpoint: dict, path: str) -> None:
    """The gate every stored config passes before it is walked or parsed (trust.py, the CLI, a rebuild): the run's
    YAML text and the pickled hyperparameters must be finite and of a config's size. An alias that contains itself,
    or aliases that expand exponentially, are refused in the time it takes to read the text."""
    def refuse(what: str, why: str):
        return CheckpointError(f"Refused to use {path}: its stored {what} {why}, which no config written by mnist_lit "
                               "does, so nothing in it was parsed or imported. Use a checkpoint from a run you trust, "
                               "or a fresh one from fit.")

    text = checkpoint.get("run_config")
    if text is not None:
        if not isinstance(text, str) or len(text) > STORED_CONFIG_CHARS:
            raise refuse("run config", f"is not YAML text of at most {STORED_CONFIG_CHARS:,} characters")
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)  # aliases stay shared nodes: nothing expands yet
            size = expanded_size(root, yaml_children) if root is not None else 0
        except RecursionError as err:
            raise refuse("run config", f"is nested without end ({err or 'too deep'})") from None
        except yaml.YAMLError as err:
            raise refuse("run config", f"is not plain YAML ({str(err).splitlines()[0]})") from None
        if size > STORED_CONFIG_NODES:
            raise refuse("run config", f"expands to {size:,} entries through its aliases")
    for section in ("hyper_parameters", "datamodule_hyper_parameters"):
        try:
            size = expanded_size(checkpoint.get(section) or {}, python_children)
        except RecursionError as err:
            raise refuse(section, f"is nested without end ({err or 'too deep'})") from None
        if size > STORED_CONFIG_NODES:
            raise refuse(section, f"expands to {size:,} entries through shared references")


def module_config(checkpoint: dict) -> dict:
    """``{class_path, init_args}`` of the LightningModule that wrote the checkpoint: from the run's config it
    carries, else (a checkpoint saved from Python) from its hyperparameters."""
    if checkpoint.get("run_config"):
        model = yaml.safe_load(checkpoint["run_config"]).get("model") or {}
        return model if "class_path" in model else {"class_path": DEFAULT_MODEL, "init_args": model}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
    return {"class_path": hparams.pop("_class_path", DEFAULT_MODEL), "init_args": hparams}


def rebuild_module(path: str, vouched: Iterable[str] = ()) -> L.LightningModule:
    """The checkpoint's LightningModule, built from its recorded class and arguments, with its weights; what it
    names is imported only when vouched for (``mnist_lit.trust``; ``vouched``: names beyond the default ones)."""
    checkpoint = load_checkpoint(path)  # weights only: nothing in the file runs
    check_imports(path, checkpoint, vouched)  # nor does anything it names, unless vouched for
    config = module_config(checkpoint)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=False)
    try:
        module = parser.instantiate_classes(parser.parse_object({"model": config})).model
    except Exception as err:  # jsonargparse's import and argument errors, the class's own
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path} was written by {config['class_path']}, which cannot be rebuilt here "
                              f"({reason}). Run from where that class is importable (the repository root, or with "
                              "its package installed).") from None
    module.load_state_dict(checkpoint["state_dict"])
    return module


def check_fits(model: nn.Module, path: str) -> None:
    """Raise, naming every differing layer, when the checkpoint's weights do not fit ``model``."""
    if path in SPECIAL_CKPT_PATHS:
        return
    # The network's weights only: metric states and the like are not part of the architecture.
    theirs = {k: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("net.")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("net.")}
    problems = [f"{name} is {list(theirs[name].shape)} there but {list(t.shape)} here"
                for name, t in ours.items() if name in theirs and theirs[name].shape != t.shape]
    problems += [f"{name} is missing there" for name in ours if name not in theirs]
    problems += [f"{name} is unknown here" for name in theirs if name not in ours]
    if problems:
        raise CheckpointError(f"Checkpoint {path} holds another network than the one configured: "
                              f"{'; '.join(problems)}. Configure the network it was trained with (its run folder's "
                              "config.yaml: --config <run>/config.yaml), or pass a checkpoint of this network.")


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``--checkpoint.*``) that keeps the best so far across a resume. A resumed fit
    writes a new run folder, and Lightning reloads only the best checkpoint's path when the folder changed, not its
    score: the first validation after the resume became the new best whatever its score, and fit's test pass
    tested it. Here the earlier best (its score, its file in the earlier run's folder) stands until a better one
    comes; Lightning never removes a file outside this run's folder, so the earlier run stays as it was."""

    def load_state_dict(self, state_dict: dict) -> None:
        best = state_dict.get("best_model_path")
        if best and Path(best).is_file():
            state_dict = {**state_dict, "dirpath": self.dirpath}  # Lightning's own restore, as if in the same folder
        super().load_state_dict(state_dict)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every epoch, and also when the run is interrupted (SIGTERM, e.g. a scheduler's
    pre-emption, or Ctrl-C), mid-epoch included; not on errors, whose state may be broken (NaN)."""

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:  # another run's folder: nothing to carry over
            super().load_state_dict(state_dict)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        interrupted = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if interrupted and self.dirpath and not trainer.sanity_checking:
            # weights_only=False, said outright: the whole state a resume needs (and no notice that it defaulted)
            trainer.save_checkpoint(str(Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"),
                                    weights_only=False)
