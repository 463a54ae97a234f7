"""Scale-out on CPU: 2-process DDP, 2 "nodes" under torchrun, bf16-mixed, FSDP; each in its own processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_args, free_port, launch, only_run, read_events, scalar

pytestmark = pytest.mark.slow  # every test here starts several processes

TRAINER = REPO / "configs" / "trainer"
TESTS = Path(__file__).parent


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m mnist_lit ARGS` in a new process (DDP re-launches it once per rank) in tmp_path."""
    assert Path.cwd() == tmp_path
    done = launch(args, PYTHONPATH=str(TESTS), **env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def writer_processes(run: Path) -> int:
    """How many processes wrote event files into the run (their names end in .<host>.<pid>.<n>)."""
    return len({p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")})


def ddp_args(data: Path, logs: Path, *extra: str) -> list[str]:
    return fit_args(data, logs, "--trainer", str(TRAINER / "ddp.yaml"), "--trainer.accelerator", "cpu",
                    "--trainer.devices", "2", *extra)


def assert_ranks_share_each_epoch(shards: Path, epochs: int) -> None:
    """What tests/shard_recorder.py wrote: per epoch, the two ranks' rows are disjoint halves of one permutation
    of the 499 training rows (one dropped so both ranks step equally), and the permutation changes per epoch."""
    for epoch in range(epochs):
        rank0, rank1 = (json.loads((shards / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2))
        assert len(rank0) == len(rank1) == 249
        assert not set(rank0) & set(rank1) and len(set(rank0 + rank1)) == 498
    epoch0 = json.loads((shards / "rank0-epoch0.json").read_text())
    assert epoch0 != json.loads((shards / "rank0-epoch1.json").read_text())  # reshuffled per epoch


def test_ddp_ranks_share_each_epoch_and_write_one_run(tiny_mnist: Path, tmp_path: Path):
    shards = tmp_path / "shards"
    shards.mkdir()
    run_cli(ddp_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--data.val_size", "101",
                     "--trainer.callbacks+=shard_recorder.ShardRecorder"), tmp_path, SHARD_RECORDER_DIR=str(shards))
    assert_ranks_share_each_epoch(shards, epochs=2)
    run = only_run(tmp_path / "logs")  # one TensorBoard run, one config, one set of checkpoints
    assert writer_processes(run) == 1 and (run / "config.yaml").is_file()
    assert sorted(p.name.split("-")[0] for p in (run / "checkpoints").iterdir()) == ["best", "last.ckpt"]
    # 249 rows per rank at batch 32: 8 steps per epoch, each one SGD step on both ranks
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16


def test_ddp_validation_metrics_equal_a_single_process_evaluation(tiny_mnist: Path, tmp_path: Path):
    # 101 validation rows: rank 0 counts 51, rank 1 counts 50; the synced metric must count all 101.
    run_cli(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "1", "--data.val_size", "101"), tmp_path)
    ckpt = str(only_run(tmp_path / "fit") / "checkpoints" / "last.ckpt")
    single = fit_args(tiny_mnist, tmp_path / "single", "--data.val_size", "101", "--ckpt_path", ckpt)
    double = ddp_args(tiny_mnist, tmp_path / "ddp", "--data.val_size", "101", "--ckpt_path", ckpt)
    for args in (single, double):
        args[0] = "validate"
        run_cli(args, tmp_path)
    one, two = read_events(only_run(tmp_path / "single")), read_events(only_run(tmp_path / "ddp"))
    assert scalar(one, "val/acc") == scalar(two, "val/acc")
    assert scalar(one, "val/loss") == pytest.approx(scalar(two, "val/loss"), rel=1e-6)


NODE_DEADLINE = 240  # s: well under torchrun's 300 s exit barrier, so a node that waits on a failed peer shows
PEER_GRACE = 60  # s: how long one node may still run after the other has exited, before the test says so


def torchrun_nodes(tmp_path: Path, args: list[str], nodes: int, procs: int) -> list[tuple[int, str]]:
    """Run ``nodes`` torchrun agents of ``procs`` workers each on 127.0.0.1, all waited on at once, with
    torchrun's own logging (LOGLEVEL=INFO, every worker's output teed under --log-dir). Returns each node's
    (exit code, console) once all exited; fails naming the node, its exit code and its log when a node fails,
    or when one node is still running PEER_GRACE s after another exited (torchrun's exit barrier waits 300 s
    for a peer whose workers failed), or at NODE_DEADLINE."""
    port, started, consoles, agents = free_port(), time.monotonic(), [], []
    for node in range(nodes):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
                   str(procs), "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "--tee", "3", "--log-dir", str(tmp_path / f"torchrun-node{node}"), "-m", "mnist_lit", *args]
        consoles.append(tmp_path / f"node{node}.log")
        with consoles[-1].open("w") as out:  # a file, not a pipe: no node blocks on output nobody reads yet
            agents.append(subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, "LOGLEVEL": "INFO", "PYTHONPATH": str(TESTS)},
                                           start_new_session=True))  # its own group: the agent and its workers

    def report(node: int) -> str:
        return f"node {node} (exit code {agents[node].poll()}):\n{consoles[node].read_text()[-3000:]}"

    first_exit = None
    try:
        while any(agent.poll() is None for agent in agents):
            now = time.monotonic()
            failed = [n for n, agent in enumerate(agents) if agent.poll() not in (None, 0)]
            if failed:
                pytest.fail(f"node {failed[0]} failed; " + "\n".join(report(n) for n in range(nodes)))
            if first_exit is None and any(agent.poll() is not None for agent in agents):
                first_exit = now
            if first_exit is not None and now - first_exit > PEER_GRACE:
                waiting = [n for n, agent in enumerate(agents) if agent.poll() is None]
                pytest.fail(f"node(s) {waiting} still running {PEER_GRACE} s after another node exited 0: waiting "
                            "at torchrun's exit barrier; " + "\n".join(report(n) for n in range(nodes)))
            if now - started > NODE_DEADLINE:
                pytest.fail(f"the nodes did not finish within {NODE_DEADLINE} s; "
                            + "\n".join(report(n) for n in range(nodes)))
            time.sleep(0.2)
        failed = [n for n, agent in enumerate(agents) if agent.returncode != 0]
        if failed:
            pytest.fail(f"node {failed[0]} failed; " + "\n".join(report(n) for n in range(nodes)))
    finally:
        for agent in agents:  # no node (torchrun and its workers) outlives the test, whatever happened
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    return [(agent.returncode, console.read_text()) for agent, console in zip(agents, consoles, strict=True)]


def test_two_nodes_under_torchrun_train_checkpoint_and_log_once(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(TRAINER / "multinode.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1")
    consoles = torchrun_nodes(tmp_path, args, nodes=2, procs=1)  # two "machines" on 127.0.0.1, gloo backend
    assert all(code == 0 and "Results:" in "".join(c for _, c in consoles) for code, _ in consoles)
    run = only_run(tmp_path / "logs")
    assert writer_processes(run) == 1
    assert sorted(p.name.split("-")[0] for p in (run / "checkpoints").iterdir()) == ["best", "last.ckpt"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8  # 250 rows per node at batch 32


def test_one_torchrun_agent_with_two_workers_trains_and_exits(tiny_mnist: Path, tmp_path: Path):
    # One agent, so no exit barrier between agents: what a single machine's `torchrun --nproc-per-node 2` runs.
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(TRAINER / "ddp.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "1")
    ((code, console),) = torchrun_nodes(tmp_path, args, nodes=1, procs=2)
    assert code == 0 and "Results:" in console
    run = only_run(tmp_path / "logs")
    assert writer_processes(run) == 1 and (run / "metrics.json").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_a_failing_node_is_named_with_its_exit_code_and_log(tiny_mnist: Path, tmp_path: Path):
    # Node 1's worker fails at its exit (after its results): node 0's agent would wait 300 s at the barrier.
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(TRAINER / "multinode.yaml"),
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
                    "--trainer.callbacks+=exit_hang.FailOnRank", "--trainer.callbacks.rank", "1")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        torchrun_nodes(tmp_path, args, nodes=2, procs=1)
    assert time.monotonic() - started < NODE_DEADLINE
    message = str(failure.value)
    assert message.startswith("node 1 failed") and "FailOnRank: rank 1 fails on purpose" in message


def test_two_unseeded_tasks_under_simulated_srun_share_each_epoch_and_write_one_run(tiny_mnist: Path,
                                                                                    tmp_path: Path):
    # What srun gives each of 2 tasks on one node; Lightning's SLURMEnvironment starts no processes itself. Unseeded,
    # each task has its own torch seed: the permutation must still be rank 0's on both.
    shards = tmp_path / "shards"
    shards.mkdir()
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(TRAINER / "ddp.yaml"), "--trainer.accelerator",
                    "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "2", "--data.val_size", "101",
                    "--seed_everything", "false", "--trainer.callbacks+=shard_recorder.ShardRecorder")
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mnist", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(TESTS),
             "SHARD_RECORDER_DIR": str(shards)}
    tasks = [subprocess.Popen([sys.executable, "-m", "mnist_lit", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in range(2)]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-4000:]
    assert_ranks_share_each_epoch(shards, epochs=2)
    run = only_run(tmp_path / "logs")  # rank 1 did not claim a version_N of its own
    assert writer_processes(run) == 1 and (run / "metrics.json").is_file()


def test_ddp_spawn_writes_one_run(tiny_mnist: Path, tmp_path: Path):
    # The launcher spawns the ranks from the process that claimed the folder: they inherit its version.
    run_cli(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.strategy", "ddp_spawn", "--trainer.accelerator", "cpu",
                     "--trainer.devices", "2", "--trainer.max_epochs", "1"), tmp_path)
    run = only_run(tmp_path / "logs")  # fit, its test pass and the results are three processes in turn, one folder
    assert (run / "metrics.json").is_file() and (run / "config.yaml").is_file()
    events = read_events(run)  # rank 0 alone logged: one point each, no second rank's copy
    assert len(scalar(events, "val/acc")) == 1 and len(scalar(events, "test/acc")) == 1


def test_a_distributed_run_that_hangs_at_exit_fails_fast_with_its_stack(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                    "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.callbacks+=exit_hang.HangAtExit")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mnist_lit", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(TESTS), "MNIST_LIT_EXIT_TIMEOUT": "2"})
    assert done.returncode == 1 and time.monotonic() - started < 100  # not the hour the hang would take
    assert "Timeout (0:00:02)!" in done.stderr and "time.sleep" not in done.stdout  # the stack, on stderr
    assert (only_run(tmp_path / "logs") / "metrics.json").is_file()  # the results were written before


def test_bf16_mixed_precision_trains_on_cpu(tiny_mnist: Path, tmp_path: Path):
    run_cli(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.precision", "bf16-mixed",
                     "--trainer.max_epochs", "2"), tmp_path)
    assert scalar(read_events(only_run(tmp_path / "logs")), "val/acc")[-1] > 0.9
