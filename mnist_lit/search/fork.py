"""A trial's fit, forked from a process that imported the CLI once: ``python -m mnist_lit <argv>`` without
paying its imports again.

Importing torch, Lightning and jsonargparse is about 3 s of CPU per process, longer than a short trial's own
training (mnist_lit/clock.py's ``start_up``). The search starts one server per command (multiprocessing's
``forkserver``: a fresh interpreter that imports ``mnist_lit.cli`` through mnist_lit/preload.py, the collector
paused, then what trials import besides, mnist_lit/search/trial_imports.py, and forks on request, never
computing), and each trial is a child of it, so that it is still a process of its own, as before:
- its console (stdout and stderr) goes to the trial's log file; its exit code is the one ``python -m mnist_lit``
  would give (``sys.exit("error: ...")`` is 1, a signal is minus its number);
- Ctrl-C reaches it through the terminal's process group (the server ignores it), and it gets SIGTERM, writing
  its last.ckpt, when the server dies, which happens when the search's process dies, SIGKILL included;
- a rank that Lightning launches (``strategy=ddp``) is ``python -m mnist_lit ...`` again, as from a shell.

What it shares with the server is what the imports made; its own modules (``--model my_research.SAM``) are
imported in the child, from the files as they are then, and it runs in the caller's working directory and
environment as they are when it starts, as a subprocess would. Its ``metrics.json`` ``seconds`` count from the
fork.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def start(argv: list[str], stdout: Path, stderr: Path | None = None,
          env: dict[str, str] | None = None) -> multiprocessing.Process:
    """``python -m mnist_lit <argv>`` in a forked child, started: its stdout appended to ``stdout``, its stderr
    to ``stderr`` (by default the same file), its environment ``env`` (by default this process's)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mnist_lit.preload", "mnist_lit.search.trial_imports"])  # at the server's start
    process = context.Process(target=_main, name="mnist_lit fit", args=(
        argv, str(stdout), str(stderr or stdout), os.getpid(), os.getcwd(), dict(os.environ if env is None else env)))
    process.start()
    return process


def run(argv: list[str], timeout: float | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m mnist_lit <argv>`` forked and waited for, its stdout and stderr captured, as ``subprocess.run``
    with ``capture_output=True, text=True``; past ``timeout`` seconds it is killed and ``TimeoutExpired`` raised."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        process = start(argv, out, err, env)
        process.join(timeout)
        captured = [path.read_text() if path.is_file() else "" for path in (out, err)]
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout, *captured)
        return subprocess.CompletedProcess(argv, process.exitcode, *captured)


def _main(argv: list[str], stdout: str, stderr: str, search: int, cwd: str, environ: dict[str, str]) -> None:
    """In the child: what ``python -m mnist_lit`` does once its imports are done."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the server's death (the search's) stops it
    try:
        os.kill(search, 0)
    except ProcessLookupError:  # the search died before that line: its server is going, and no SIGTERM would come
        os._exit(128 + signal.SIGTERM)
    os.chdir(cwd)  # the server's are those of the moment it started
    os.environ.clear()
    os.environ.update(environ)
    for stream, path in ((1, stdout), (2, stderr)):
        log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, stream)
        os.close(log)
    main_module = sys.modules["__main__"]
    main_module.__spec__ = importlib.util.find_spec("mnist_lit.__main__")  # as `python -m mnist_lit` sets them:
    sys.argv = [main_module.__spec__.origin, *argv]  # Lightning launches further ranks from these two
    try:
        from mnist_lit.cli import main

        main(argv)
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit; the interpreter would run these
