"""What a checkpoint may import: every class path its stored config names is checked before anything is imported.

    python -m mnist_lit test --ckpt_path downloaded.ckpt                         # refused if it names foreign code
    python -m mnist_lit test --ckpt_path downloaded.ckpt --trust_imports their_pkg   # vouched for by you

A checkpoint carries its run's config (``run_config``) and, when saved from Python, its module's hyperparameters.
Parsing either imports every module a ``class_path`` (or any dotted name jsonargparse resolves) names, and an
import runs that module's code: loading tensors only (``weights_only``) shuts the pickle door, this one shuts the
import door, as Hugging Face's ``trust_remote_code`` does. A name is vouched for when it is

- in the packages the template is built on (``VOUCHED_PACKAGES``);
- the user's own code: a module found in the working directory or on ``PYTHONPATH``, outside the Python
  installation (so ``--model my_research.SAM`` tests and resumes from its checkpoint with no flag);
- named by the user: on the command line, in a config file they pass, or in ``--trust_imports``.

Nothing is imported to decide: only top-level modules are looked up (``importlib.util.find_spec("a.b")`` would
import ``a``), and a name whose top-level module cannot be found at all imports nothing, so it is left to
jsonargparse's own error.
"""

from __future__ import annotations

import importlib.util
import os
import re
import site
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

VOUCHED_PACKAGES = ("mnist_lit", "torch", "torchvision", "lightning", "torchmetrics", "optuna")
TRUST_OPTION = "--trust_imports"
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # what jsonargparse may import: a.b.C
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class UntrustedImports(RuntimeError):
    """A checkpoint names code nobody vouched for; the message is one paragraph naming each and the fix."""


def dotted_names(tree, where: str = "") -> Iterator[tuple[str, str]]:
    """(name, key) for every string in a parsed config that jsonargparse could import: dotted names anywhere."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from dotted_names(value, f"{where}.{key}" if where else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from dotted_names(value, f"{where}[{i}]")
    elif isinstance(tree, str) and DOTTED.fullmatch(tree):
        yield tree, where


def stored_names(checkpoint: dict, path: str) -> list[tuple[str, str]]:
    """(name, where) for each dotted name in what parsing the checkpoint imports from: its run's config and the
    hyperparameters Lightning rebuilds a module (or data module) from."""
    try:
        run_config = yaml.safe_load(checkpoint.get("run_config") or "{}")
    except yaml.YAMLError as err:
        raise UntrustedImports(f"{path} carries a run config that is not plain YAML ({str(err).splitlines()[0]}), "
                               "so it was not parsed and nothing it names was imported. Use a checkpoint written "
                               "by mnist_lit's fit.") from None
    found = [(name, f"run config, {key}") for name, key in dotted_names(run_config)]
    for section in ("hyper_parameters", "datamodule_hyper_parameters"):
        found += [(name, f"{section}, {key}") for name, key in dotted_names(checkpoint.get(section) or {})]
    return found


def named_by_user(argv: Iterable[str]) -> set[str]:
    """What the user vouches for: the dotted names in their command line and in the config files it passes
    (``--config F``, ``--trainer F``, ...), and each module listed in ``--trust_imports a,b`` (there or in a file)."""
    argv = list(argv)
    names: set[str] = set()
    trusted: list[str] = []
    for i, token in enumerate(argv):
        if token == TRUST_OPTION and i + 1 < len(argv):
            trusted.append(argv[i + 1])
        elif token.startswith(TRUST_OPTION + "="):
            trusted.append(token.split("=", 1)[1])
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if value.endswith(CONFIG_SUFFIXES) and Path(value).is_file():
            try:
                tree = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # jsonargparse names the file and its fault
            names |= {name for name, _ in dotted_names(tree)}
            if isinstance(tree, dict) and isinstance(tree.get(TRUST_OPTION[2:]), str):
                trusted.append(tree[TRUST_OPTION[2:]])
        elif value[:1] in "{[":  # an inline YAML/JSON value, e.g. --model '{class_path: ...}'
            try:
                names |= {name for name, _ in dotted_names(yaml.safe_load(value))}
            except yaml.YAMLError:
                pass
        elif DOTTED.fullmatch(value):
            names.add(value)
    # A named class vouches for the modules its import runs: a.b.C for a and a.b.
    vouched = {".".join(name.split(".")[:n]) for name in names for n in range(1, name.count(".") + 1)}
    return vouched.union(*map(trusted_packages, trusted))


def trusted_packages(entry: str | None) -> set[str]:
    """``--trust_imports a,b.c``: each listed package, all its modules with it."""
    return {f"{module.strip()}.*" for module in (entry or "").split(",") if module.strip()}


def without_trust(run_config: str) -> str:
    """The run's config with every ``trust_imports`` it stored taken out (the CLI's, a teacher's): what a checkpoint
    may import is the user's word on this command, never the checkpoint's own."""
    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k != TRUST_OPTION[2:]}
        return [strip(v) for v in tree] if isinstance(tree, list) else tree
    return yaml.safe_dump(strip(yaml.safe_load(run_config)), sort_keys=False)


def installation() -> list[Path]:
    """Where the Python installation keeps its modules: the standard library and every site-packages."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages()}
    paths |= {p for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(key))}
    return [Path(p).resolve() for p in paths if p]


def user_code(spec) -> bool:
    """A top-level module of the user's own: found in the working directory or on PYTHONPATH, outside the Python
    installation (a virtual environment inside the working directory included)."""
    locations = [spec.origin] if spec.origin and spec.origin not in ("built-in", "frozen") else []
    locations += list(spec.submodule_search_locations or [])
    if not locations:
        return False
    roots = [Path.cwd(), *(Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    roots = [r.resolve() for r in roots]
    inside = installation()
    for location in map(lambda p: Path(p).resolve(), locations):
        if not any(location.is_relative_to(r) for r in roots) or any(location.is_relative_to(i) for i in inside):
            return False
    return True


def vouched_for(name: str, vouched: set[str]) -> bool:
    module = name.rpartition(".")[0]  # what jsonargparse imports; all its parents are imported with it
    top = module.split(".")[0]
    packages = {*VOUCHED_PACKAGES, *(v[:-2] for v in vouched if v.endswith(".*"))}
    if any(module == p or module.startswith(p + ".") for p in packages) or module in vouched:
        return True
    try:
        spec = importlib.util.find_spec(top)  # top-level: imports nothing
    except (ImportError, ValueError):
        return False
    return spec is None or user_code(spec)  # None: nothing to import, jsonargparse says it cannot


def check_imports(path: str, checkpoint: dict, vouched: Iterable[str] = ()) -> None:
    """Raise ``UntrustedImports``, naming each class path and where the checkpoint holds it, when the checkpoint's
    stored config names code that nobody vouched for (see the module docstring); nothing is imported."""
    vouched = set(vouched)
    refused = [(name, where) for name, where in stored_names(checkpoint, path) if not vouched_for(name, vouched)]
    if refused:
        listing = "; ".join(f"{name} (at {where})" for name, where in refused)
        modules = ",".join(dict.fromkeys(name.split(".")[0] for name, _ in refused))
        raise UntrustedImports(
            f"{path} names code that nobody vouched for, and importing a module runs it: {listing}. Nothing was "
            f"imported. If you trust where the checkpoint came from, accept it with {TRUST_OPTION} {modules}; "
            f"vouched for without it are {', '.join(VOUCHED_PACKAGES)}, your own modules in the working directory "
            "or on PYTHONPATH, and what your command line or config files name.")
