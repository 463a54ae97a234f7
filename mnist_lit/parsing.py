"""What jsonargparse says while LightningCLI parses, made one paragraph: a ``--model`` that cannot be used (its class
or any of its init_args, whose errors nest screens deep in subclass mode), and the init_args that a new
``--model`` class drops without a word.

    python -m mnist_lit fit --config configs/default.yaml --model my_research.MyModule   # says what was dropped
    python -m mnist_lit fit --config configs/default.yaml --model.lrr 0.1                # names the key and the fix
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser

from mnist_lit.runs import launched_rank

# The scaffolding of jsonargparse's nested errors, not reasons.
STRUCTURE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Parser key",
             "- Problem with given class_path", "- Expected a <class 'NoneType'>", "- Does not validate")


def model_error(message: str) -> str | None:
    """jsonargparse's error about ``--model`` (its class or any of its init_args, nested screens deep in subclass
    mode) as one paragraph that names the key and the fix; None for any other error, or one it cannot read."""
    if not message.startswith('Parser key "model":'):
        return None
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)':", message)
    detail = re.search(r"Problem with given class_path '[^']+':\n\s+(\S[^\n]*)", message)
    detail = detail[1] if detail and not detail[1].startswith("Parser key") else ""
    given = re.search(r"Given value: ([^\n]*)", message)
    given = given and (re.search(r"val='([^']*)'", given[1]) or re.match(r"(.*)", given[1]))[1]
    cls = classes[0] if classes else given
    if "required" in detail:
        return (f"--model {cls} needs arguments that neither the config nor the command line gives: "
                f"{detail.split(': ', 1)[-1]}. Give them with --model.<name> VALUE (or under model.init_args in "
                f"YAML); python -m mnist_lit fit --model.help {cls} lists them.")
    if option := re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", detail):
        return (f"--model.{option[1] or option[2]} is not an argument of {cls}: check its spelling, or the class "
                f"(--model); python -m mnist_lit fit --model.help {cls} lists the arguments it takes.")
    if detail:
        return (f"--model {cls} cannot be imported ({detail}): give the import path of a LightningModule class, e.g. "
                "mnist_lit.model.MNISTClassifier or a subclass of it in a module importable from where you run (the "
                "repository root, or an installed package).")
    if not classes and "does not correspond to a subclass of LightningModule" in message:
        return (f"--model {given} is not a LightningModule: --model takes mnist_lit.model.MNISTClassifier (the "
                "default), a subclass of it, or any other LightningModule; a network (an nn.Module) goes in "
                "--model.net.")
    if len(keys) < 2:
        return None
    path = f"model.{keys[1]}" + "".join(f".init_args.{key}" for key in keys[2:])  # the short form users type
    reasons = [line.strip().removeprefix("- ") for line in message.splitlines()
               if line.strip() and not line.strip().startswith(STRUCTURE) and "Parser key" not in line]
    if (option := re.search(r"Option '([^']+)' is not accepted", " ".join(reasons))) and classes:
        return (f"--{path}.init_args.{option[1]} is not an argument of {classes[-1]}: check its spelling; python -m "
                f"mnist_lit fit --{path}.help {classes[-1]} lists the arguments it takes.")
    return f"--{path} cannot be {given.split('. Got value: ')[0]!r} (in {cls}): {'; '.join(reasons)}."


class DroppedArguments(logging.Handler):
    """Hears jsonargparse drop the init_args that a new ``--model`` class does not take (it does so silently, by
    design, when a class_path changes), so that the run can say which, once."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.dropped: dict[str, list[str]] = {}  # new class -> the old class's arguments it does not take

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"Due to class_path change from '(.+?)' to '(.+?)', discarding init_args: (.*)",
                         record.getMessage(), flags=re.S)
        if found and self.is_module(found[1]):
            keys = self.dropped.setdefault(found[2], [])
            keys += [k for k in re.findall(r"'(\w+)': ", found[3]) if k not in keys]

    @staticmethod
    def is_module(class_path: str) -> bool:
        module, _, name = class_path.rpartition(".")
        try:
            return issubclass(getattr(importlib.import_module(module), name), L.LightningModule)
        except (ImportError, AttributeError, TypeError):
            return False

    def notice(self, model_class: str) -> None:
        keys = self.dropped.get(model_class)
        if keys and not launched_rank():
            print(f"mnist_lit: --model {model_class} does not take {', '.join(keys)}, which the configs or defaults "
                  "before it set for the class they named: those settings were dropped (jsonargparse keeps only "
                  "the init_args the new class takes).", file=sys.stderr)


class Parser(LightningArgumentParser):
    """LightningCLI's parser, with a one-paragraph refusal of a ``--model`` class that cannot be used."""

    def error(self, message: str, ex: Exception | None = None):
        paragraph = model_error(message)
        if paragraph is None or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        sys.stderr.write(f"error: {paragraph}\n")
        sys.exit(2)
