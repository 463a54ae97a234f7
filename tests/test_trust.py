"""A checkpoint from elsewhere imports nothing its user has not vouched for: every class path its stored config
names, wherever it sits, is checked before any import; the refusal names each one and where it sits; your own
module's checkpoint needs no flag; --trust_imports accepts the rest."""

import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fails_with, fit_args, only_run, run_main, write_mnist
from mnist_lit.cli import main

FOREIGN = "foreign_pkg"  # a module that is importable, but neither the user's own nor named by them


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a one-epoch fit of the default config, with an augmentation and an extra callback."""
    root = tmp_path_factory.mktemp("trusted")
    data = write_mnist(root / "data")
    main(fit_args(data, root / "logs", "--trainer.max_epochs", "1", "--test_after_fit", "false",
                  "--data.augment", "mnist_lit.augment.RandomAffine",
                  "--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary"))
    return only_run(root / "logs") / "checkpoints" / "last.ckpt"


@pytest.fixture
def foreign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package on sys.path (as an installed one is), outside the working directory and PYTHONPATH, whose import
    leaves a marker file: the proof that it was imported."""
    site = tmp_path / "site"
    (site / FOREIGN).mkdir(parents=True)
    marker = tmp_path / "imported"
    (site / FOREIGN / "__init__.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        """))
    monkeypatch.syspath_prepend(str(site))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    yield marker
    sys.modules.pop(FOREIGN, None)


def with_config(checkpoint: Path, out: Path, edit) -> Path:
    """A copy of the checkpoint whose stored run config went through edit(config)."""
    contents = torch.load(checkpoint, weights_only=True)
    config = yaml.safe_load(contents["run_config"])
    edit(config)
    contents["run_config"] = yaml.safe_dump(config)
    torch.save(contents, out)
    return out


PLACES = {  # where a class path can sit in a run's config -> how the tests put a foreign one there
    "model": lambda c: c["model"].__setitem__("class_path", f"{FOREIGN}.Module"),
    "network": lambda c: c["model"]["init_args"]["net"].__setitem__("class_path", f"{FOREIGN}.Net"),
    "schedule": lambda c: c["model"]["init_args"]["lr_scheduler"].__setitem__("class_path", f"{FOREIGN}.Schedule"),
    "optimizer (a bare name)": lambda c: c["model"]["init_args"].__setitem__("optimizer", f"{FOREIGN}.Optimizer"),
    "augmentation": lambda c: c["data"]["init_args"]["augment"].__setitem__("class_path", f"{FOREIGN}.Augment"),
    "callback": lambda c: c["trainer"]["callbacks"].append({"class_path": f"{FOREIGN}.Callback"}),
    "logger": lambda c: c["trainer"]["logger"].__setitem__("class_path", f"{FOREIGN}.Logger"),
}


@pytest.mark.parametrize("place", PLACES)
def test_a_foreign_class_path_anywhere_in_the_config_is_refused_before_its_import(checkpoint, foreign, tmp_path,
                                                                                  place):
    evil = with_config(checkpoint, tmp_path / "evil.ckpt", PLACES[place])
    message = fails_with(["test", "--ckpt_path", str(evil)])
    assert f"{FOREIGN}." in message and "--trust_imports foreign_pkg" in message and str(evil) in message
    assert not foreign.exists() and FOREIGN not in sys.modules  # nothing it names ran


def test_the_refusal_names_each_class_path_and_where_it_sits(checkpoint, foreign, tmp_path):
    def two(config):
        PLACES["network"](config)
        PLACES["callback"](config)
    message = fails_with(["test", "--ckpt_path", str(with_config(checkpoint, tmp_path / "evil.ckpt", two))])
    assert f"{FOREIGN}.Net (at run config, model.init_args.net.class_path)" in message
    assert f"{FOREIGN}.Callback (at run config, trainer.callbacks[1].class_path)" in message


def test_the_standard_library_is_not_vouched_for(checkpoint, tmp_path, capsys):
    """The case found by hand: `this` printed the Zen of Python before the refusal."""
    evil = with_config(checkpoint, tmp_path / "evil.ckpt",
                       lambda c: c["model"]["init_args"]["net"].__setitem__("class_path", "this.Nothing"))
    already = "this" in sys.modules
    message = fails_with(["test", "--ckpt_path", str(evil)])
    assert "this.Nothing" in message and "Beautiful is better than ugly" not in capsys.readouterr().out
    assert already or "this" not in sys.modules


def test_an_old_checkpoints_hyperparameters_are_checked_too(checkpoint, foreign, tmp_path):
    """A checkpoint saved without a run config: Lightning rebuilds the module from its hyperparameters."""
    contents = torch.load(checkpoint, weights_only=True)
    del contents["run_config"]
    contents["hyper_parameters"]["_class_path"] = f"{FOREIGN}.Module"
    torch.save(contents, tmp_path / "old.ckpt")
    message = fails_with(["test", "--ckpt_path", str(tmp_path / "old.ckpt")])
    assert f"{FOREIGN}.Module (at hyper_parameters, _class_path)" in message and not foreign.exists()


def test_trust_imports_accepts_what_the_user_vouches_for(checkpoint, foreign, tmp_path):
    evil = with_config(checkpoint, tmp_path / "evil.ckpt", PLACES["callback"])
    with pytest.raises(SystemExit):  # accepted, imported, and then found not to hold that class
        main(["test", "--ckpt_path", str(evil), "--trust_imports", f"other,{FOREIGN}"])
    assert foreign.read_text() == "ran"


def test_a_class_the_user_names_themselves_is_vouched_for(checkpoint, foreign, tmp_path):
    evil = with_config(checkpoint, tmp_path / "evil.ckpt", PLACES["callback"])
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(evil), f"--trainer.callbacks+={FOREIGN}.Callback"])
    assert foreign.exists()
    config = tmp_path / "mine.yaml"  # the same by a config file the user passes
    config.write_text(f"trust_imports: {FOREIGN}\n")
    foreign.unlink()
    sys.modules.pop(FOREIGN)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(config), "--ckpt_path", str(evil)])
    assert foreign.exists()


def test_your_own_modules_checkpoint_tests_with_no_flag(tmp_path, monkeypatch, tiny_mnist):
    """A module of the user's in the working directory (or on PYTHONPATH): fit, then test from its checkpoint."""
    work = tmp_path / "research"
    work.mkdir()
    (work / "my_research.py").write_text(textwrap.dedent("""\
        from mnist_lit.model import MNISTClassifier


        class Mine(MNISTClassifier):
            pass
        """))
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # python -m puts the working directory first on sys.path
    monkeypatch.delenv("PYTHONPATH", raising=False)
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1", "--test_after_fit", "false",
                  "--model", "my_research.Mine"))
    last = only_run(tmp_path / "logs") / "checkpoints" / "last.ckpt"
    cli = main(["test", "--ckpt_path", str(last), "--trainer.logger.init_args.save_dir", str(tmp_path / "t")])
    assert type(cli.model).__name__ == "Mine"


def test_export_and_a_teacher_are_checked_too(checkpoint, foreign, tmp_path, tiny_mnist):
    from mnist_lit.export import main as export

    evil = with_config(checkpoint, tmp_path / "evil.ckpt", PLACES["network"])
    with pytest.raises(SystemExit) as exit_:
        export([str(evil), "--format", "pt2"])
    assert f"{FOREIGN}.Net" in str(exit_.value.code) and "--trust_imports" in str(exit_.value.code)
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1",
                                  "--model", "mnist_lit.examples.distillation.Distillation",
                                  "--model.teacher_checkpoint", str(evil)))
    assert f"{FOREIGN}.Net (at run config, model.init_args.net.class_path)" in message
    assert not foreign.exists()


def test_a_checkpoint_cannot_vouch_for_its_own_teacher(checkpoint, foreign, tmp_path):
    """A student's checkpoint stores its teacher's trust_imports; resuming it trusts only what the user says now."""
    teacher = with_config(checkpoint, tmp_path / "teacher.ckpt", PLACES["network"])

    def student(config):
        config["model"]["class_path"] = "mnist_lit.examples.distillation.Distillation"
        config["model"]["init_args"] |= {"teacher_checkpoint": str(teacher), "trust_imports": FOREIGN}
    resumed = with_config(checkpoint, tmp_path / "student.ckpt", student)
    message = fails_with(["fit", "--ckpt_path", str(resumed), "--trainer.max_epochs", "2"])
    assert f"{teacher} names code" in message and f"{FOREIGN}.Net" in message and not foreign.exists()


# -- a stored config that would hang or overflow whatever walks or parses it -----------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(  # 3.9e9 YAML nodes once *j expands
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefghi", "bcdefghij", strict=True))
HOSTILE = {
    "an alias that contains itself": ("model: &m {init_args: {net: *m}}\n", "is nested without end"),
    "a billion laughs": (LAUGHS + "model: {class_path: mnist_lit.model.MNISTClassifier, init_args: {x: *j}}\n",
                         "expands to 8,335,593,974 entries"),
    "nesting 100,000 deep": ("[" * 100_000 + "]" * 100_000, "is nested without end"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_stored_config_is_refused_within_seconds(checkpoint, tmp_path, case):
    text, reason = HOSTILE[case]
    contents = torch.load(checkpoint, weights_only=True)
    contents["run_config"] = text
    torch.save(contents, tmp_path / "hostile.ckpt")
    started = time.monotonic()
    done = run_main(main, ["test", "--ckpt_path", str(tmp_path / "hostile.ckpt")], timeout=30)  # fails past 30 s
    assert time.monotonic() - started < 10  # on the landed main: a RecursionError traceback, or a hang
    message = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in message and "Traceback" not in message
    assert f"Refused to use {tmp_path / 'hostile.ckpt'}: its stored run config {reason}" in message


def test_pickled_hyperparameters_that_contain_themselves_are_refused(checkpoint, tmp_path):
    contents = torch.load(checkpoint, weights_only=True)
    del contents["run_config"]  # a checkpoint saved from Python: Lightning rebuilds it from its hyperparameters
    loop: list = ["mnist_lit.model.MLP"]
    loop.append(loop)
    contents["hyper_parameters"]["net"] = loop
    torch.save(contents, tmp_path / "loop.ckpt")
    message = fails_with(["test", "--ckpt_path", str(tmp_path / "loop.ckpt")])
    assert "its stored hyper_parameters is nested without end (it contains itself)" in message
