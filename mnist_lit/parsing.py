"""What jsonargparse says while LightningCLI parses, made one paragraph: a ``--model`` that cannot be used (its class
or any of its init_args, whose errors nest screens deep in subclass mode), and the init_args that a new
``--model`` class drops without a word.

    python -m mnist_lit fit --config configs/default.yaml --model my_research.MyModule   # says what was dropped
    python -m mnist_lit fit --config configs/default.yaml --model.lrr 0.1                # names the key and the fix
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import sys

import lightning as L
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from mnist_lit.runs import launched_rank

# A restricted number (PositiveInt, ClosedUnitInterval: int and float subclasses) that jsonargparse carries over when
# --model or --data changes class, to an argument of the new class typed plain int or float, stays that object, which
# YAML's safe dumper cannot write ("cannot represent an object"): written as the number it is. (bool has a
# representer of its own, found first.)
yaml.SafeDumper.add_multi_representer(int, yaml.representer.SafeRepresenter.represent_int)
yaml.SafeDumper.add_multi_representer(float, yaml.representer.SafeRepresenter.represent_float)

# The scaffolding of jsonargparse's nested errors, not reasons.
STRUCTURE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Parser key",
             "- Problem with given class_path", "- Expected a <class 'NoneType'>", "- Does not validate")


def arguments_of(class_path: str) -> list[str]:
    """The ``__init__`` arguments of a class named by a class path (already imported by the parse that failed)."""
    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p for p, v in parameters.items() if p != "params" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]


def did_you_mean(given: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(given, known, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def not_an_argument(key: str, option: str, cls: str) -> str:
    """The paragraph for ``--<key>.<option>`` that ``cls`` does not take, its closest arguments and the help command
    that lists them all (--model and --data take their arguments without init_args)."""
    flag = f"--{key}.{option}" if key in ("model", "data") else f"--{key}.init_args.{option}"
    prefix = f"--{key}." if key in ("model", "data") else f"--{key}.init_args."
    return (f"{flag} is not an argument of {cls}.{did_you_mean(option, arguments_of(cls), prefix)} Check its "
            f"spelling, or the class; python -m mnist_lit fit --{key}.help {cls} lists the arguments it takes.")


def class_argument_error(message: str) -> str | None:
    """jsonargparse's error about an argument that a class chosen by class_path below the model (a logger, a
    callback, a data module) does not take, as one paragraph; None for any other error."""
    key = re.match(r'Parser key "([^"]+)":', message)
    problem = re.search(r"Problem with given class_path '([^']+)':\s+Option '([^']+)' is not accepted", message)
    return not_an_argument(key[1], problem[2], problem[1]) if key and problem else None


def unknown_flags(message: str, flags: list[str], prog: str) -> str | None:
    """argparse's "unrecognized arguments" as one paragraph: each flag, the known flags closest to it, and the help
    command; an abbreviation (refused: a flag is written in full) gets the flag it abbreviates."""
    found = re.match(r"unrecognized arguments: (.*)", message, flags=re.S)
    given = [arg.split("=")[0] for arg in found[1].split() if arg.startswith("--")] if found else []
    if not given:
        return None
    parts = []
    for flag in given:
        whole = [known for known in flags if known.startswith(flag)]
        if len(whole) == 1:
            parts.append(f"{flag} is short for {whole[0]}, and flags are taken only in full: write {whole[0]}.")
        else:
            parts.append(f"{flag} is not an option of {prog}.{did_you_mean(flag, flags)}")
    return f"{' '.join(parts)} {prog} --help lists every option."


def model_error(message: str) -> str | None:
    """jsonargparse's error about ``--model`` or ``--data`` (the class or any of its init_args, nested screens deep in
    subclass mode) as one paragraph that names the key and the fix; None for any other error, or one it cannot
    read."""
    group = re.match(r'Parser key "(model|data)":', message)
    if not group:
        return None
    group = group[1]
    base, default = (("LightningModule", "mnist_lit.model.MNISTClassifier") if group == "model" else
                     ("LightningDataModule", "mnist_lit.data.MNISTDataModule"))
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)':", message)
    detail = re.search(r"Problem with given class_path '[^']+':\n\s+(\S[^\n]*)", message)
    detail = detail[1] if detail and not detail[1].startswith("Parser key") else ""
    given = re.search(r"Given value: ([^\n]*)", message)
    given = given and (re.search(r"val='([^']*)'", given[1]) or re.match(r"(.*)", given[1]))[1]
    cls = classes[0] if classes else given
    if "required" in detail:
        return (f"--{group} {cls} needs arguments that neither the config nor the command line gives: "
                f"{detail.split(': ', 1)[-1]}. Give them with --{group}.<name> VALUE (or under {group}.init_args in "
                f"YAML); python -m mnist_lit fit --{group}.help {cls} lists them.")
    if option := re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", detail):
        return not_an_argument(group, option[1] or option[2], cls)
    if detail and not re.search(r"Parser key|Expected|[Nn]ot a valid|must be", detail):
        return (f"--{group} {cls} cannot be imported ({detail}): give the import path of a {base} class, e.g. "
                f"{default} or a class of your own in a module importable from where you run (the repository root, "
                "or an installed package).")
    if not classes and f"does not correspond to a subclass of {base}" in message:
        return (f"--{group} {given} is not a {base}: --{group} takes {default} (the default) or any other {base} "
                "by its class path" + ("; a network (an nn.Module) goes in --model.net." if group == "model" else
                                       ", e.g. a module of your own (docs/extending.md)."))
    if len(keys) < 2:
        return None
    path = f"{group}.{keys[1]}" + "".join(f".init_args.{key}" for key in keys[2:])  # the short form users type
    reasons = [line.strip().removeprefix("- ") for line in message.splitlines()
               if line.strip() and not line.strip().startswith(STRUCTURE) and "Parser key" not in line]
    if (option := re.search(r"Option '([^']+)' is not accepted", " ".join(reasons))) and classes:
        # The innermost class: a callable's (optimizer, schedule) shows only in the value it was given.
        inner = re.findall(r"Got value: Namespace\(class_path='([^']+)'", message)
        return not_an_argument(path, option[1], inner[-1] if inner else classes[-1])
    return f"--{path} cannot be {given.split('. Got value: ')[0]!r} (in {cls}): {'; '.join(reasons)}."


class DroppedArguments(logging.Handler):
    """Hears jsonargparse drop the init_args that a new ``--model`` or ``--data`` class does not take (it does so
    silently, by design, when a class_path changes), so that the run can say which, once."""

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
            cls = getattr(importlib.import_module(module), name)
            return issubclass(cls, (L.LightningModule, L.LightningDataModule))
        except (ImportError, AttributeError, TypeError):
            return False

    def notice(self, model_class: str, flag: str = "--model") -> None:
        keys = self.dropped.get(model_class)
        if keys and not launched_rank():
            print(f"mnist_lit: {flag} {model_class} does not take {', '.join(keys)}, which the configs or defaults "
                  "before it set for the class they named: those settings were dropped (jsonargparse keeps only "
                  "the init_args the new class takes).", file=sys.stderr)


class Parser(LightningArgumentParser):
    """LightningCLI's parser, with a one-paragraph refusal of a ``--model`` class that cannot be used, and of a flag
    it does not know (the closest known ones, no screen of usage)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a parser inside a class's validation: its outer parser tells the whole story
            super().error(message, ex)
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        prog = self.prog.replace(" [options]", "")
        paragraph = model_error(message) or class_argument_error(message) or unknown_flags(message, flags, prog)
        if paragraph is None or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        sys.stderr.write(f"error: {paragraph}\n")
        sys.exit(2)
