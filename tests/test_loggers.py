"""Every logger works by config, and every run writes config.yaml, checkpoints and metrics.json into a
folder of its own: TensorBoard (the default, tests/test_cli.py), CSV, several at once, none, MLflow, W&B offline."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import fit_args, read_events, scalar
from mnist_lit.cli import main
from mnist_lit.runs import run_folder

CSV = "lightning.pytorch.loggers.CSVLogger"


def fit(data: Path, tmp_path: Path, *extra: str) -> Path:
    """A 2-epoch fit (then its test pass); the run folder it printed."""
    cli = main(fit_args(data, tmp_path / "tb", "--trainer.max_epochs", "2", "--torch_threads", "1", *extra))
    return run_folder(cli.trainer)


def assert_complete_run(folder: Path) -> dict:
    """config.yaml, both checkpoints and metrics.json with the test result: what any run leaves."""
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert len(list((folder / "checkpoints").glob("best-*.ckpt"))) == 1
    record = json.loads((folder / "metrics.json").read_text())
    assert 0.5 < record["metrics"]["test/acc"] <= 1 and record["global_step"] == 32
    assert {"git_commit", "torch", "lightning"} <= set(record["environment"])
    return record


def test_csv_logger_gets_the_curves_and_the_results(tiny_mnist: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture):
    folder = fit(tiny_mnist, tmp_path, "--trainer.logger", CSV, "--trainer.logger.save_dir", str(tmp_path / "csv"),
                 "--trainer.logger.name", "mnist")
    assert folder == tmp_path / "csv" / "mnist" / "version_0"
    record = assert_complete_run(folder)
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")][-1] > 0.5
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(0, 32))  # log_every_n_steps 1
    assert float(next(r["hp/test_acc"] for r in rows if r.get("hp/test_acc"))) == record["metrics"]["test/acc"]
    notices = [r.message for r in caplog.records if "need a TensorBoardLogger" in r.message]
    assert len(notices) == 1 and "CSVLogger" in notices[0]  # the pictures step aside, once, saying so


def test_several_loggers_each_get_every_curve(tiny_mnist: Path, tmp_path: Path):
    folder = fit(tiny_mnist, tmp_path, f"--trainer.logger+={CSV}", "--trainer.logger.save_dir", str(tmp_path / "csv"))
    assert folder.parent.parent == tmp_path / "tb"  # the first logger's folder holds the run
    assert_complete_run(folder)
    (csv_folder,) = (tmp_path / "csv").glob("*/version_0")
    rows = list(csv.DictReader((csv_folder / "metrics.csv").open()))
    events = read_events(folder)
    for tag in ("train/loss", "val/acc", "test/acc"):
        assert [float(r[tag]) for r in rows if r.get(tag)] == pytest.approx(scalar(events, tag)), tag


def test_no_logger_still_gives_each_run_its_own_folder(tiny_mnist: Path, tmp_path: Path):
    # runs without a logger go to logs/mnist/version_N under the cwd (conftest: this test's tmp_path)
    folders = [fit(tiny_mnist, tmp_path, "--trainer.logger", "false") for _ in range(2)]
    assert folders == [Path("logs/mnist/version_0"), Path("logs/mnist/version_1")]
    for folder in folders:
        assert_complete_run(folder)
        assert not list(folder.glob("events.out.tfevents.*"))
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["logger"] is False


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="the mlflow extra is not installed "
                    "(pip install -e '.[mlflow]')")
def test_mlflow_logger_with_a_local_sqlite_store(tiny_mnist: Path, tmp_path: Path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = fit(tiny_mnist, tmp_path, "--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger",
                 "--trainer.logger.experiment_name", "mnist", "--trainer.logger.tracking_uri", uri,
                 "--trainer.logger.save_dir", str(tmp_path / "mlruns"))
    record = assert_complete_run(folder)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert run.data.metrics["hp/test_acc"] == pytest.approx(record["metrics"]["test/acc"])
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    assert run.data.params["optimizer/init_args/lr"] == "0.1"


WANDB = "lightning.pytorch.loggers.WandbLogger"


def outside_connections(trace: Path) -> list[str]:
    """connect() calls in an strace log to anything but this machine (loopback, or a local socket file)."""
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line and "AF_INET" in line]
    local = ("127.", "::1", "::ffff:127.")
    return [c for c in calls if not any(f'inet_addr("{p}' in c or f'"{p}' in c for p in local)]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra is not installed "
                    "(pip install -e '.[wandb]')")
def test_wandb_logger_offline_holds_the_run_and_sends_nothing(tiny_mnist: Path, tmp_path: Path):
    import shutil
    import subprocess
    import sys

    strace = shutil.which("strace")
    home = tmp_path / "wandb-home"  # W&B's settings, cache and data here, none in the user's home
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false",
           "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "WANDB_DIR": str(tmp_path / "logs")}
    args = fit_args(tiny_mnist, tmp_path / "tb", "--trainer.max_epochs", "2", "--trainer.logger", WANDB,
                    "--trainer.logger.offline", "true", "--trainer.logger.project", "mnist",
                    "--trainer.logger.save_dir", str(tmp_path / "logs"))
    trace = tmp_path / "connect.trace"
    command = [sys.executable, "-m", "mnist_lit", *args]
    if strace:  # every connect() of the run and of W&B's own service process
        command = [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (folder,) = (tmp_path / "logs" / "mnist").iterdir()  # the run folder: <save_dir>/<project>/<run id>
    record = assert_complete_run(folder)
    (offline,) = (tmp_path / "logs" / "wandb").glob(f"offline-run-*-{folder.name}")
    records = list(wandb_records(offline / f"run-{folder.name}.wandb"))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert len([row for row in history if "val/acc" in row]) == 2  # the curves: one val/acc point per epoch
    assert len([row for row in history if "train/loss" in row]) == 32  # log_every_n_steps 1
    assert [row["hp/test_acc"] for row in history if "hp/test_acc" in row] == [
        pytest.approx(record["metrics"]["test/acc"])]  # the final results
    (exit_,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_.exit_code == 0  # the run was finished, not cut off at exit: wandb sync takes it whole
    if strace:
        assert "sa_family=AF_UNIX" in trace.read_text()  # strace saw the run talk to W&B's service process
        assert not outside_connections(trace), outside_connections(trace)
    else:
        pytest.skip("strace is not installed: the run and its files were checked, not its connections")


def wandb_records(path: Path):
    """The records of an offline W&B run file: LevelDB's log format behind W&B's 7-byte header (':W&B', 0xBEE1,
    version), 32 KiB blocks of chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last), each record a
    wandb_internal_pb2.Record. W&B 0.31 reads these in its Go core only, so the test reads them itself."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
