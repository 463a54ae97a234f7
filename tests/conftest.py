"""Data the tests write themselves (tiny IDX files), the real MNIST set when present, a TensorBoard reader, and
two ways to run a command without a fresh interpreter's imports: ``run_main`` (in this process) and ``launch``
(a forked process of its own)."""

import contextlib
import functools
import gc
import gzip
import io
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.idx import DATASETS
from mnist_lit.search import fork

REPO = Path(__file__).resolve().parents[1]
REAL_MNIST = REPO.parent / "shared" / "datasets" / "mnist"
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist (.ci/run does)


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic 00 00 08 <ndim>, big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def write_idx(path: Path, array: torch.Tensor, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def learnable_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28x28 uint8 images whose label is written as a bright row band (row 2 + 2*label), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
    return images, labels.to(torch.uint8)


@functools.cache
def learnable_idx_files(n: int, seed: int, gz: bool) -> tuple[bytes, bytes]:
    """The bytes of ``learnable_digits(n, seed)``'s images and labels IDX files, gzipped or not: made once per
    test process, written by every test that asks."""
    images, labels = learnable_digits(n, seed)
    return tuple(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a) for a in (images, labels))


def write_mnist(root: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, folder: str = "MNIST") -> Path:
    """A tiny MNIST-shaped data set under root/<folder>/raw/ with torchvision's file names; returns root."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        for kind, data in zip(("images-idx3", "labels-idx1"), learnable_idx_files(n, seed, gz), strict=True):
            raw.joinpath(f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")).write_bytes(data)
    return root


def pytest_configure(config: pytest.Config) -> None:
    """In a process that collects (an xdist worker, or the one process of -n 0), the collector waits until the test
    modules' imports (torch, Lightning, Optuna: hundreds of thousands of objects) are done, then skips them."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        gc.disable()


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.freeze()  # what the imports made lives as long as the worker: out of the collector's way, as in __main__.py
    gc.enable()


# The files that take longest, longest first (seconds of test time from `pytest --durations=0`, 2 cores): pytest-xdist
# hands out whole files in collection order (pyproject.toml: --dist loadfile --no-loadscope-reorder), so the long
# ones start first and the short ones fill the gaps at the end. The order schedules and nothing more: a file not
# named here runs after these, and a stale order costs seconds, never a result.
LONGEST_FIRST = ["test_distributed", "test_search", "test_search_resume", "test_real_mnist", "test_exactness",
                 "test_faults", "test_export", "test_search_grid", "test_own_modules", "test_cli", "test_optimization",
                 "test_requeue", "test_own_data", "test_loggers", "test_trainer_flags", "test_resume", "test_predict",
                 "test_extending"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file keeps its own order


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: what a run writes relative to the cwd (runs without a logger,
    Lightning's folder for an MLflow store) never lands in the repository. tests/ is on PYTHONPATH, as a user's own
    modules are: the callbacks and modules written here are theirs, vouched for in a checkpoint (mnist_lit/trust.py)."""
    monkeypatch.chdir(tmp_path)
    paths = (str(REPO / "tests"), os.environ.get("PYTHONPATH"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real MNIST files as <root>/MNIST/raw/*.gz (never written to in place)."""
    sources = [REAL_MNIST / f"{name}.gz" for name in DATASETS["mnist"].files]
    if not all(p.is_file() for p in sources):
        pytest.skip(f"real MNIST not found at {REAL_MNIST} (the shared data folder beside the repo)")
    raw = tmp_path_factory.mktemp("real") / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in sources:  # copyfile, not copytree: the shared folder is read-only, the copy must not be
        shutil.copyfile(source, raw / source.name)
    return raw.parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_events(run_dir: Path) -> EventAccumulator:
    """TensorBoard's own reader over every event file of one run."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalar(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def only_run(log_root: Path) -> Path:
    runs = sorted(log_root.glob("*/version_*"))
    assert len(runs) == 1, f"expected one run under {log_root}, found {runs}"
    return runs[0]


def fails_with(args: list[str]) -> str:
    """The CLI's one-paragraph error for args: main() ends with sys.exit("error: ..."), i.e. exit code 1."""
    from mnist_lit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def fit_args(data_root: Path, log_root: Path, *extra: str) -> list[str]:
    """CLI args for a short run on the given data, logging under log_root, on one torch thread (results depend
    on the thread count; runs in a test, in-process or not, must agree)."""
    return ["fit", "--config", str(REPO / "configs" / "default.yaml"), "--torch_threads", "1",
            "--data.data_dir", str(data_root), "--data.verify_checksums", "false",
            "--trainer.logger.init_args.save_dir", str(log_root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.batch_size", "32", "--data.val_size", "100", "--trainer.log_every_n_steps", "1", *extra]


def run_main(main: Callable[[list[str]], int | None], argv: list[str],
             timeout: float = 600) -> subprocess.CompletedProcess:
    """What ``subprocess.run([python, -m, module, *argv], capture_output=True, text=True, timeout=...)`` gives, from
    the module's ``main(argv)`` run in this process, without a second interpreter's 3 s of imports: its stdout and
    stderr captured, its ``SystemExit`` the exit code (a message goes to stderr with code 1, as the interpreter
    does), the signal handlers it installs put back. Past ``timeout`` its own SIGTERM handler stops what it started
    (a search's trials), and the test fails saying so."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = set(threading.enumerate())
    out, err = io.StringIO(), io.StringIO()

    def too_long(_signum, _frame):
        raise TimeoutError(f"{argv} ran past its {timeout} s")

    previous_alarm = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv) or 0
            except SystemExit as exit_:
                code = exit_.code or 0
                if not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
    except TimeoutError as late:
        stop = signal.getsignal(signal.SIGTERM)
        if callable(stop) and stop is not handlers[signal.SIGTERM]:
            stop(signal.SIGTERM, None)
        for thread in set(threading.enumerate()) - threads:
            thread.join(60)
        for child in multiprocessing.active_children():
            child.kill()
        pytest.fail(f"{late}; its stdout: {out.getvalue()[-2000:]} its stderr: {err.getvalue()[-2000:]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def launch(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m mnist_lit ARGS`` in a process of its own, run in this test's folder with this environment plus
    ``env``, as ``subprocess.run(capture_output=True, text=True)`` gives it: forked from the server that a search
    forks its trials from (mnist_lit/search/fork.py), which imported the CLI once for this test worker."""
    return fork.run(args, timeout, {**os.environ, **env})
