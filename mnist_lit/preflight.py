"""A data module of your own (``--data my_data.MyData``) and the model: sized to each other before anything is built,
then one batch through the network before any training.

The model's ``num_classes``, and the network's ``num_classes`` and ``in_features`` where it takes them (the MLP
takes both), come from the data module's ``num_classes`` and ``dims`` (the shape of one example), as lightning-
hydra-template's data modules give them, wherever the config leaves them at their defaults; one given that
contradicts the data is refused by name (the data module is built once more for this: its work belongs in
``setup``). Then one batch is checked: batches are (inputs, targets), labels fit the classes the model counts, and
the network takes the inputs. Each mismatch is refused in one paragraph naming the data module, both shapes and the
fix, before the first step, instead of a traceback from the middle of a layer. (``MNISTDataModule`` checks its files
as it reads them: 28x28 images, labels 0-9.)

    python -m mnist_lit fit --config configs/default.yaml --data my_data.MyData
"""

from __future__ import annotations

import importlib
import inspect
import math

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mnist_lit.data import MNISTDataModule


class DataMismatch(MisconfigurationException):
    """A data module whose batches the model cannot train on; the message is one paragraph naming the fix."""


def describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(describe(v) for v in value[:3])})"
    return f"a {type(value).__name__}"


def classes_of(model: L.LightningModule, datamodule: L.LightningDataModule) -> int | None:
    """The classes the model counts (its ``num_classes``), else the data module's."""
    return getattr(model.hparams, "num_classes", None) or getattr(datamodule, "num_classes", None)


def check_batch(model: L.LightningModule, datamodule: L.LightningDataModule, batch) -> None:
    """Raise ``DataMismatch`` unless ``batch`` is (inputs, class indices) within the model's classes and the network
    maps its inputs to one logit per class."""
    name = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(map(torch.is_tensor, batch))):
        raise DataMismatch(f"--data {name} serves batches of {describe(batch)}, but the template trains on "
                           "(inputs, targets) pairs of tensors: have its datasets return (x, y), or its collate_fn.")
    x, y = batch
    if y.dim() != 1 or y.is_floating_point() or len(y) != len(x):
        raise DataMismatch(f"--data {name} serves targets of shape {tuple(y.shape)} and type {y.dtype} for "
                           f"{len(x)} inputs: the template's loss takes one class index per input, an integer "
                           "tensor of shape (B,).")
    classes = classes_of(model, datamodule)
    if classes and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataMismatch(f"--data {name} serves the label {int(y.max()) if y.max() >= classes else int(y.min())}, "
                           f"outside the {classes} classes the model counts (0 to {classes - 1}): give the model and "
                           f"its network the data's class count (--model.num_classes N, "
                           "--model.net.init_args.num_classes N), or fix the labels.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x[:2].to(model.device))
    except RuntimeError as err:
        raise DataMismatch(f"The network {type(getattr(model, 'net', model)).__name__} cannot take the inputs of "
                           f"--data {name}, one example of shape {tuple(x.shape[1:])} ({x[0].numel()} values): "
                           f"{str(err).splitlines()[0]}. Size its input to the data, e.g. --model.net.init_args."
                           f"in_features {x[0].numel()} for the MLP, or choose a network that takes "
                           f"{tuple(x.shape[1:])}.") from None
    finally:
        model.train(was_training)
    if classes and (logits.dim() != 2 or logits.shape[1] != classes):
        raise DataMismatch(f"The network {type(getattr(model, 'net', model)).__name__} gives outputs of shape "
                           f"{tuple(logits.shape[1:])} per example, but the model counts {classes} classes: give the "
                           "network the same class count (--model.net.init_args.num_classes N).")


def sized_to_data(config) -> list[str]:
    """Fill the model's class count, and the network's class count and input size, in ``config`` (a parsed fit/test/...
    config) from its data module's ``num_classes`` and ``dims``, where the config leaves them at their defaults;
    returns what was filled, as ``--key value``. MNISTDataModule's data sets are 28x28 with 10 classes, the
    defaults: nothing to do."""
    if config.data.class_path == f"{MNISTDataModule.__module__}.{MNISTDataModule.__qualname__}":
        return []
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", fail_untyped=False)
    try:
        data = parser.instantiate_classes(parser.parse_object({"data": config.data.as_dict()})).data
    except Exception:  # LightningCLI builds it next and says what is wrong with it, in its own words
        return []
    classes, dims = getattr(data, "num_classes", None), getattr(data, "dims", None)
    wanted = {"num_classes": classes, "in_features": math.prod(dims) if dims else None}
    name = config.data.class_path
    filled = []
    places = [("model", config.model)]
    net = config.model.init_args.get("net")
    if net is not None and net.get("class_path"):  # any network that takes num_classes or in_features
        places.append(("model.net", net))
    for key, group in places:
        for argument, value in wanted.items():
            if value is None or argument not in group.init_args:
                continue
            given = group.init_args[argument]
            try:
                default = inspect.signature(_class(group.class_path)).parameters[argument].default
            except (ImportError, AttributeError, KeyError, TypeError, ValueError):
                default = inspect.Parameter.empty  # not to be read: a given value stands, and is checked
            if given == default and given != value:
                group.init_args[argument] = value
                filled.append(f"--{key}.{argument} {value}")
            elif given != value:
                raise DataMismatch(f"--{key}.{argument} is {given}, but --data {name} gives {value} "
                                   f"({'its num_classes' if argument == 'num_classes' else f'its dims {dims}'}): "
                                   f"give {value}, or leave --{key}.{argument} at its default to take the data "
                                   "module's.")
    return filled


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Preflight(L.Callback):
    """Runs ``check_batch`` on the first training batch of a data module other than MNISTDataModule, at fit start
    (the model on its device, before the first step)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or isinstance(datamodule, MNISTDataModule):
            return
        check_batch(pl_module, datamodule, next(iter(datamodule.train_dataloader())))
