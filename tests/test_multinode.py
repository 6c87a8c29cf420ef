"""Two simulated nodes on one machine: torchrun's c10d rendezvous, TP inside a node, PP across nodes.

Each "node" is one ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d``
launcher; both rendezvous on 127.0.0.1. With the c10d backend torchrun ignores ``--node-rank``
and numbers the nodes itself (sorted by host name, then the agent's pid), so the tests read
which launcher became node 1 from the per-node start-up line of ``pretrain_gpt.py``.
Global rank = node rank x 2 + local rank, so with TP=2 x PP=2 each node holds one pipeline stage
(its two TP ranks) and the pipeline crosses the nodes.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from equivalence import FP32, TINY, assert_tensors_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")
NODE_RE = re.compile(r"megalite: node (\d+) of (\d+) \(([^)]*)\): ranks (.*)")
RANK_RE = re.compile(r"(\d+) \(tp (\d+), pp (\d+), dp (\d+), cp (\d+)\)")
ITERS = 8
ARGS = TINY + ["--train-iters", str(ITERS)]
LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
TIMEOUT = 300  # seconds per launch: a hang fails the test instead of blocking CI
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _kill(procs: list[subprocess.Popen]) -> None:
    """Stop the launchers and their workers: torchrun starts each worker in a session of its own,
    so the workers' process groups are killed as well as the launchers'."""
    for p in procs:
        if p.poll() is None:
            workers = _children(p.pid)
            for pgid in [p.pid, *workers]:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _two_nodes(args: list[str], tmp_path, max_restarts: int = 0, **env: str) -> list[str]:
    """Launch two torchrun 'nodes' of 2 workers each; return their outputs (stdout + stderr)."""
    port = _free_port()
    procs, logs, timed_out = [], [], False
    try:
        for node in (0, 1):
            log = open(tmp_path / f"node{node}.log", "w+")
            logs.append(log)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "2", "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"megalite-test-{port}",
                   os.path.join(ROOT, "pretrain_gpt.py"), *args]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(**env),
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:  # a hang: kill both nodes and fail with their output
                timed_out = True
                break
            if any(p.poll() not in (None, 0) for p in procs):  # one node failed: give up on both
                time.sleep(5)
                break
            time.sleep(0.5)
    finally:
        _kill(procs)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    assert not timed_out and codes == [0, 0], (f"{'timed out after %d s; ' % TIMEOUT if timed_out else ''}"
                                               f"launcher exit codes {codes}\n" + "\n".join(o[-3000:] for o in outputs))
    return outputs


def _losses(text: str) -> dict[int, float]:
    """Iteration -> lm loss; a resumed run's repeated iterations keep their last value."""
    out = {}
    for m in LOSS_RE.finditer(text):
        assert int(m.group(2)) == ITERS
        out[int(m.group(1))] = float(m.group(3))
    return out


def _node_lines(output: str) -> list[tuple[int, dict[int, tuple[int, int, int, int]]]]:
    """(node rank, {rank: (tp, pp, dp, cp)}) for each per-node start-up line in ``output``."""
    lines = []
    for m in NODE_RE.finditer(output):
        assert int(m.group(2)) == 2
        ranks = {int(r[0]): tuple(int(x) for x in r[1:]) for r in RANK_RE.findall(m.group(4))}
        lines.append((int(m.group(1)), ranks))
    return lines


def _assert_close(ref: dict[int, float], got: dict[int, float], rtol: float = 1e-5) -> None:
    assert sorted(got) == list(range(1, ITERS + 1)), f"iterations logged: {sorted(got)}"
    for it in range(1, ITERS + 1):
        assert abs(got[it] - ref[it]) <= rtol * abs(ref[it]), f"iteration {it}: {got[it]!r} != serial {ref[it]!r}"


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """The single-process reference: ``python pretrain_gpt.py`` with the same flags; its losses
    and its final weights (saved, read back by global name)."""
    save = str(tmp_path_factory.mktemp("serial") / "ckpt")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *ARGS, "--save", save],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    losses = _losses(out.stdout)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert losses[ITERS] < losses[1]  # it trains
    return {"losses": losses, "weights": _weights(save)}


def _weights(save: str) -> dict:
    """The final weights of a run by global name, as numpy arrays."""
    from megalite.checkpointing.convert import read_megalite_checkpoint
    return {name: t.float().numpy() for name, t in read_megalite_checkpoint(save)[0].items()}


def _assert_weights_close(ref: dict, got: dict) -> None:
    """The weights of a multi-node run equal the serial run's (FP32 tolerances of the harness)."""
    assert_tensors_close(ref, got, FP32.param_rtol, FP32.param_atol_lr * 3e-3, "weights at the end")  # TINY's lr


@pytest.mark.slow
def test_two_nodes_tp_inside_node_pp_across_nodes(tmp_path, serial_run):
    save = str(tmp_path / "ckpt")
    outputs = _two_nodes(ARGS + LAYOUT + ["--save", save], tmp_path)
    # Each launcher's local rank 0 states its node's ranks and their coordinates, once.
    nodes = {}
    for out in outputs:
        lines = _node_lines(out)
        assert len(lines) == 1, out[-3000:]
        node, ranks = lines[0]
        nodes[node] = ranks
    assert sorted(nodes) == [0, 1]
    for node, ranks in nodes.items():
        # global rank = node rank x 2 + local rank; the node's two ranks are one TP group of one stage
        assert sorted(ranks) == [2 * node, 2 * node + 1]
        assert sorted(c[0] for c in ranks.values()) == [0, 1]          # tp 0 and 1: TP inside the node
        assert {c[1] for c in ranks.values()} == {node}                # pp = node: PP across the nodes
        assert {c[2:] for c in ranks.values()} == {(0, 0)}             # dp 0, cp 0
    losses = _losses("".join(outputs))
    _assert_close(serial_run["losses"], losses)
    _assert_weights_close(serial_run["weights"], _weights(save))


@pytest.mark.slow
def test_worker_killed_on_node_1_restarts_both_nodes_and_resumes(tmp_path, serial_run):
    serial_losses = serial_run["losses"]
    save = str(tmp_path / "ckpt")
    fault_rank = 3  # local rank 1 of node 1 (the last pipeline stage's second TP rank)
    args = ARGS + LAYOUT + ["--save", save, "--load", save, "--save-interval", "3",
                            "--inject-fault-at-iteration", "5", "--inject-fault-rank", str(fault_rank)]
    # Multi-node elastic runs need torchrun's per-round store (see examples/multinode.md): with the
    # shared agent store, a node restarted because the other re-joined keeps its restart count,
    # and the attempt-keyed store prefix then mixes rounds (a failure or a hang, about half the time).
    outputs = _two_nodes(args, tmp_path, max_restarts=1, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    by_node = {}
    for out in outputs:
        lines = _node_lines(out)
        # one start-up line per attempt: the fault in node 1 restarted the workers of both nodes
        assert len(lines) == 2 and lines[0] == lines[1], out[-3000:]
        by_node[lines[0][0]] = out
        assert "no checkpoint found" in out
        assert re.search(r"loaded checkpoint \S+iter_0000003 \(iteration 3,", out), out[-3000:]
    assert sorted(by_node) == [0, 1]
    assert f"injected fault: rank {fault_rank} exits after iteration 5" in by_node[1]
    assert "injected fault" not in by_node[0]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(ITERS)
    # iterations 4-5 ran twice (before the fault and after resuming from iteration 3); all equal
    # the uninterrupted serial run
    second_attempt = list(NODE_RE.finditer(by_node[1]))[1].start()
    first = {int(m.group(1)): float(m.group(3)) for m in LOSS_RE.finditer(by_node[1][:second_attempt])}
    assert {1, 2, 3, 4} <= set(first) <= {1, 2, 3, 4, 5}
    for it, loss in first.items():
        assert abs(loss - serial_losses[it]) <= 1e-5 * abs(serial_losses[it])
    _assert_close(serial_losses, _losses("".join(outputs)))
    _assert_weights_close(serial_run["weights"], _weights(save))


SBATCH = os.path.join(ROOT, "examples", "slurm", "pretrain_gpt.sbatch")


def test_slurm_recipe_is_a_valid_launch():
    """The SLURM recipe: valid bash, one torchrun per node on a c10d rendezvous at the first node,
    and training flags that pass pretrain_gpt.py's validation at its node count with TP in a node."""
    from megalite.config import parse_args
    from megalite.parallel_state import rank_groups

    assert subprocess.run(["bash", "-n", SBATCH], timeout=60).returncode == 0
    text = open(SBATCH).read()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    assert "#SBATCH --ntasks-per-node=1" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    launch = text[text.index("srun "):]
    for piece in ("python -m torch.distributed.run", '--nnodes "$SLURM_JOB_NUM_NODES"',
                  '--nproc-per-node "$GPUS_PER_NODE"', "--rdzv-backend c10d",
                  '--rdzv-endpoint "$RDZV_HOST:$RDZV_PORT"', '--rdzv-id "$SLURM_JOB_ID"', "--max-restarts",
                  'pretrain_gpt.py "${TRAIN_ARGS[@]}"'):
        assert piece in launch, piece
    # the training flags, as bash expands them
    env = _env(DATA_PREFIX="/shared/data/corpus_text_document", DATA_CACHE="/shared/cache",
               TOKENIZER_DIR="/shared/gpt2", CKPT_DIR="/shared/ckpt")
    block = re.search(r"^TRAIN_ARGS=\(.*?^\)", text, re.S | re.M).group(0)
    out = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${TRAIN_ARGS[@]}"'], capture_output=True,
                         text=True, env=env, check=True, timeout=60)
    args = out.stdout.splitlines()
    assert args[args.index("--save") + 1] == args[args.index("--load") + 1] == "/shared/ckpt"
    cfg = parse_args(args, world_size=nodes * gpus)
    tp = cfg.parallel.tensor_model_parallel_size
    assert gpus % tp == 0
    for group in rank_groups(nodes * gpus, tp=tp, pp=cfg.parallel.pipeline_model_parallel_size)["tp"]:
        assert len({r // gpus for r in group}) == 1  # every TP group inside one node
