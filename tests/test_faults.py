"""Nothing lost: bad checkpoints and folders get one paragraph, interrupted and killed runs resume exactly,
a failed checkpoint write keeps the previous one, untrusted checkpoints run no code."""

import json
import os
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fails_with, fit_args, only_run, read_events, scalar, write_mnist
from mnist_lit.checkpoints import CheckpointError, load_checkpoint
from mnist_lit.cli import main
from mnist_lit.search import fork


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.ckpt of a 1-epoch run, trained once for this file: the tests damage copies of it, never it."""
    root = tmp_path_factory.mktemp("trained")
    main(fit_args(write_mnist(root / "data"), root / "logs", "--trainer.max_epochs", "1"))
    return only_run(root / "logs") / "checkpoints" / "last.ckpt"


class WritesAFile:
    """Unpickling this runs `touch <path>`: what a malicious checkpoint would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    ckpt = torch.load(good, weights_only=True)
    other = dict(ckpt, state_dict={k: torch.zeros(7, *v.shape[1:]) if k.startswith("net.") else v
                                   for k, v in ckpt["state_dict"].items()})
    other.pop("hyper_parameters")
    files = {
        "missing": (tmp_path / "nope.ckpt", "does not exist"),
        "random bytes": (tmp_path / "random.ckpt", "is not a readable checkpoint"),
        "truncated": (tmp_path / "truncated.ckpt", "is not a readable checkpoint"),
        "not lightning": (tmp_path / "plain.pt", "not a Lightning checkpoint"),
        "other network": (tmp_path / "other.ckpt", "net.layers.1.weight is [7, 784] there but [512, 784] here"),
        "runs code": (tmp_path / "evil.ckpt", "Refused to load"),
    }
    files["random bytes"][0].write_bytes(random.Random(1).randbytes(2000))
    files["truncated"][0].write_bytes(good.read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, files["not lightning"][0])
    torch.save(other, files["other network"][0])
    torch.save({"state_dict": {}, "payload": WritesAFile(tmp_path / "PWNED")}, files["runs code"][0])
    return files


@pytest.mark.parametrize("subcommand", ["fit", pytest.param("test", marks=pytest.mark.slow)])  # the same check
@pytest.mark.parametrize("case", ["missing", "random bytes", "truncated", "not lightning", "other network",
                                  "runs code"])
def test_bad_checkpoint_gets_one_paragraph_and_runs_nothing(good: Path, tiny_mnist: Path, tmp_path: Path, case: str,
                                                            subcommand: str):
    path, expected = bad_checkpoints(tmp_path, good)[case]
    args = fit_args(tiny_mnist, tmp_path / "logs", "--ckpt_path", str(path))
    args[0] = subcommand
    message = fails_with(args)
    assert expected in message and str(path) in message
    assert not (tmp_path / "PWNED").exists()  # the malicious payload never ran
    assert torch.load(good, weights_only=True)["global_step"] == 16  # nothing already written was touched


def test_any_damaged_bytes_give_the_checkpoint_message(good: Path, tmp_path: Path):
    content = good.read_bytes()
    generator = random.Random(0)
    for trial in range(40):  # random files, and the real file cut or with a flipped byte
        damaged = bytearray(content if trial % 2 else generator.randbytes(3000))
        if trial % 2:
            damaged[generator.randrange(len(damaged))] ^= 0xFF
            damaged = damaged[: generator.randrange(len(damaged))]
        path = tmp_path / f"damaged{trial}.ckpt"
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(str(path))


def test_log_folder_that_cannot_be_written_is_named(tiny_mnist: Path, tmp_path: Path):
    (tmp_path / "a_file").write_text("not a folder")
    message = fails_with(fit_args(tiny_mnist, tmp_path / "a_file" / "logs"))
    assert "a_file is a file, not a folder" in message and "--trainer.logger.init_args.save_dir" in message


@pytest.mark.parametrize("option", ["--model.net.init_args.hidden1=0", "--model.net.init_args.hidden2=-3",
                                    "--data.eval_batch_size=0"])
def test_impossible_sizes_are_refused_at_parse_time(tiny_mnist: Path, tmp_path: Path, option: str,
                                                    capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tiny_mnist, tmp_path / "logs", option))
    assert exit_.value.code == 2 and option.split("=")[0].lstrip("-").split(".")[-1] in capsys.readouterr().err


def test_diverging_loss_stops_with_the_step_and_writes_no_broken_checkpoint(good: Path, tiny_mnist: Path,
                                                                            tmp_path: Path):
    before = good.read_bytes()
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--model.optimizer.init_args.lr", "1e9"))
    assert "The training loss became" in message and "at SGD step" in message
    assert "--model.optimizer.init_args.lr" in message
    assert good.read_bytes() == before  # an earlier run's checkpoints are untouched
    for ckpt in (tmp_path / "logs").rglob("*.ckpt"):  # and nothing non-finite was saved
        weights = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt


def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_one(tiny_mnist: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    from fsspec.implementations.local import LocalFileOpener

    real_write, state = LocalFileOpener.write, {"writes": 0}

    def disk_full_on_third_save(self, data):
        state["writes"] += 1
        if state["writes"] == 3:  # epoch 1's best checkpoint: half the bytes, then the disk is full
            real_write(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", disk_full_on_third_save)
    with pytest.raises(OSError, match="No space left"):
        main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3"))
    checkpoints = only_run(tmp_path / "logs") / "checkpoints"
    for ckpt in checkpoints.glob("*.ckpt"):  # every file there is whole and from epoch 0
        assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    assert not [p for p in checkpoints.iterdir() if not p.name.endswith(".ckpt")]  # no partial temp files


# -- interrupted and killed runs resume exactly ----------------------------------------------------------------


def long_run_args(data: Path, logs: Path, *extra: str) -> list[str]:
    # 640 batches an epoch (40 training_step calls of 16); --last_checkpoint.every_n_train_steps 32 keeps a
    # checkpoint at most 32 SGD steps old, the guard against SIGKILL.
    return fit_args(data, logs, "--trainer.max_epochs", "2", "--data.val_size", "100", *extra)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """20,580 rows and the final checkpoint of an uninterrupted 2-epoch run."""
    root = tmp_path_factory.mktemp("long")
    data = write_mnist(root / "data", n_train=100 + 640 * 32)
    main(long_run_args(data, root / "once"))
    return data, torch.load(only_run(root / "once") / "checkpoints" / "last.ckpt", weights_only=True)


def progressed_past(checkpoint: Path, step: int) -> bool:
    try:  # written atomically, so either absent, the previous one, or whole
        return torch.load(checkpoint, weights_only=True)["global_step"] > step
    except FileNotFoundError:
        return False


def interrupt(data: Path, logs: Path, sig: signal.Signals, *extra: str, env: dict | None = None) -> tuple[Path, str]:
    """Start a run, send sig at a random moment of its second epoch; return its last.ckpt and what it said on
    stderr. It must end with the shell's code for that signal, never 0 (128 + the signal's number, or killed)."""
    args = long_run_args(data, logs, "--last_checkpoint.every_n_train_steps", "32", *extra)
    stderr = logs.parent / "stderr.txt"
    run = fork.start(args, logs.parent / "stdout.txt", stderr, env)  # python -m mnist_lit ARGS, its imports done once
    checkpoints = logs / "mnist" / "version_0" / "checkpoints"
    deadline = time.monotonic() + 120
    while not progressed_past(checkpoints / "last.ckpt", 640):  # a periodic checkpoint inside the second epoch
        assert run.is_alive() and time.monotonic() < deadline, "the second epoch never started"
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.2))  # the second epoch has >= 600 steps left: well over 0.2 s
    os.kill(run.pid, sig)
    run.join(60)
    said = stderr.read_text()
    assert run.exitcode == (-sig if sig == signal.SIGKILL else 128 + sig), said[-3000:]
    assert "Traceback" not in said
    return checkpoints / "last.ckpt", said


def assert_resume_equals(once: dict, data: Path, last: Path, logs: Path, args: list[str] | None = None) -> Path:
    """Resume from last (by ``args``, else the run's own command line and --ckpt_path): the network and its
    best-so-far equal the uninterrupted run's, bit for bit. Returns the resumed run's folder."""
    main(args or [*long_run_args(data, logs), "--ckpt_path", str(last)])
    run = max(logs.glob("*/version_*"), key=lambda p: int(p.name[8:]))  # the newest: the interrupted run's is kept
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == once["global_step"] == 2 * 640
    for name, tensor in once["state_dict"].items():  # bit-identical network and best-so-far
        if name.startswith(("net.", "val_acc_best")):
            assert torch.equal(tensor, resumed["state_dict"][name]), name
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupt_mid_epoch_saves_last_checkpoint_and_its_printed_resume_equals_an_uninterrupted_run(
        long_data, tmp_path: Path, sig: signal.Signals, caplog: pytest.LogCaptureFixture):
    data, once = long_data
    last, said = interrupt(data, tmp_path / "logs", sig)
    step = torch.load(last, weights_only=True)["global_step"]
    assert 640 < step < 1280  # inside the second epoch (at the signal, or the periodic one just before it)
    assert not (last.parent.parent / "metrics.json").exists()  # the run did not finish, and no test pass ran
    paragraph = said.strip().splitlines()[-1]  # one paragraph: where it stopped, what holds it, how to go on
    assert paragraph.startswith(f"mnist_lit: {sig.name} stopped the fit at step {step} (epoch 1)")
    assert paragraph.endswith(f"Its last checkpoint, {last}, holds step {step}. Resume it with: python -m "
                              f"mnist_lit fit --ckpt_path {last}")
    assert "`weights_only` was not set" not in said  # Lightning's notice at the save on the way out
    printed = paragraph.split("Resume it with: python -m mnist_lit ")[1].split()
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        run = assert_resume_equals(once, data, last, tmp_path / "logs", printed)  # the command, as printed
    assert json.loads((run / "metrics.json").read_text())["resumed_from"] == str(last)
    # What Lightning says, and this project proves wrong or beside the point, is not said: "your dataloader is not
    # resumable" (the resume above is exact), the whole config in the args warning, the advertisements.
    heard = [str(w.message) for w in heard]
    assert not [w for w in heard if "not resumable" in w or "args parameter is intended" in w], heard
    assert "Tip:" not in caplog.text and "LitLogger" not in caplog.text


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(long_data, tmp_path: Path):
    data, once = long_data
    last, _ = interrupt(data, tmp_path / "logs", signal.SIGKILL)
    step = torch.load(last, weights_only=True)["global_step"]
    assert 640 < step < 1280 and step % 32 == 0  # a periodic checkpoint from the middle of the second epoch
    assert_resume_equals(once, data, last, tmp_path / "resumed")


def stand_in_scontrol(folder: Path) -> Path:
    """An ``scontrol`` on PATH that records its arguments, one call per line, in folder/scontrol.txt."""
    script = folder / "bin" / "scontrol"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.txt"}\n')
    script.chmod(0o755)
    return folder / "scontrol.txt"


def slurm_job(folder: Path, job: str, **more: str) -> dict[str, str]:
    """What SLURM gives the one task of job ``job``, and the stand-in scontrol first on PATH."""
    stand_in_scontrol(folder)
    return {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mnist", "SLURM_JOB_ID": job, "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NODELIST": "127.0.0.1",
            "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}", **more}


@pytest.mark.slow
def test_a_preempted_slurm_job_requeues_and_its_restart_equals_an_uninterrupted_run(
        long_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data, once = long_data
    job = slurm_job(tmp_path, "777")
    last, said = interrupt(data, tmp_path / "logs", signal.SIGUSR1, env={**os.environ, **job})  # sbatch --signal
    step = torch.load(last, weights_only=True)["global_step"]
    assert 640 < step < 1280  # written at the step boundary after the signal, not in the middle of a step
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 777\n"
    assert said.strip().splitlines()[-1].endswith(f"Its last checkpoint, {last}, holds step {step}. SLURM job 777 "
                                                  "was requeued and resumes this run by itself when it starts again.")
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own, unchecked and mid-step, is not written

    for name, value in {**job, "SLURM_RESTART_COUNT": "1"}.items():  # the requeued job: the same command again
        monkeypatch.setenv(name, value)
    run = assert_resume_equals(once, data, last, tmp_path / "logs", long_run_args(data, tmp_path / "logs"))
    assert run.name == "version_1" and json.loads((run / "metrics.json").read_text())["resumed_from"] == str(last)
    assert yaml.safe_load((run / "config.yaml").read_text())["ckpt_path"] == str(last)
    assert scalar(read_events(run), "val/acc") and read_events(run).Scalars("train/loss")[0].step > 640


@pytest.mark.slow
def test_runs_started_together_in_one_folder_get_their_own_run_folders(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1")
    logs = [tmp_path / f"run{i}.log" for i in range(3)]
    runs = [fork.start(args, log) for log in logs]  # three processes of python -m mnist_lit ARGS at once
    for run, log in zip(runs, logs, strict=True):
        run.join(300)
        assert run.exitcode == 0, log.read_text()[-3000:]
    folders = sorted((tmp_path / "logs" / "mnist").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1", "version_2"]
    for folder in folders:  # each complete, none overwritten: one writer process per folder
        assert (folder / "config.yaml").is_file() and (folder / "metrics.json").is_file()
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert len({p.name.split(".")[-2] for p in folder.glob("events.out.tfevents.*")}) == 1


def test_a_checkpoint_of_a_model_built_in_python_loads_weights_only(tiny_mnist: Path, tmp_path: Path):
    from functools import partial

    import lightning as L

    from mnist_lit.data import MNISTDataModule
    from mnist_lit.model import MLP, MNISTClassifier

    model = MNISTClassifier(net=MLP(hidden1=32, hidden2=16), optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, MNISTDataModule(data_dir=str(tiny_mnist), verify_checksums=False, val_size=100, batch_size=32))
    path = tmp_path / "python.ckpt"
    trainer.save_checkpoint(path)
    hparams = load_checkpoint(str(path))["hyper_parameters"]  # weights only: nothing pickled in it
    assert hparams["net"] == {"class_path": "mnist_lit.model.MLP"}
    assert hparams["optimizer"] == {"class_path": "torch.optim.sgd.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}
    assert trainer.callback_metrics["val/acc"] > 0.8  # trained: what the test below must find again
    args = fit_args(tiny_mnist, tmp_path / "test", "--ckpt_path", str(path), "--model.net.init_args.hidden1", "32",
                    "--model.net.init_args.hidden2", "16")
    args[0] = "test"
    main(args)
    assert scalar(read_events(only_run(tmp_path / "test")), "test/acc")[0] > 0.8  # the trained weights, restored
