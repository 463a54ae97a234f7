"""mnist_lit: MNIST digits -> a two-hidden-layer MLP trained with SGD, driven by the Lightning CLI."""

import importlib
import importlib.abc
import importlib.util
import sys

# Modules that moved into a wing, by their old names: a class path stored in a study or a checkpoint is a public
# name (mnist_lit.pruning.TrialPruning in every trial's config), so the old name still imports, lazily, and gives
# the very same classes (tests/test_search.py pins it).
MOVED = {"mnist_lit.pruning": "mnist_lit.search.pruning", "mnist_lit.study": "mnist_lit.search.study",
         "mnist_lit.storage": "mnist_lit.search.storage", "mnist_lit.search_space": "mnist_lit.search.space",
         "mnist_lit.search_report": "mnist_lit.search.report", "mnist_lit.focal": "mnist_lit.examples.focal",
         "mnist_lit.distillation": "mnist_lit.examples.distillation"}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old name of ``MOVED`` as the module it moved to (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self.own_spec = module.__spec__  # importlib sets the old name's spec on it next: undone in exec_module
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_spec


if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(MovedModules())
