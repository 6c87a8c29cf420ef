"""``--device``: one GPU per process, the CPU, or one clear line when a node has too few GPUs.

The decision is a pure function (:func:`megalite.training.device.choose_device`), tested here
for every case. The end-to-end tests fake a one-GPU machine on CPU: a ``sitecustomize`` on the
subprocess's PYTHONPATH makes ``torch.cuda.is_available()`` True and ``device_count()`` 1, so
anything that touches CUDA for real fails loudly.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from megalite.config import parse_args
from megalite.training.device import DeviceUnavailable, choose_device, process_group_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU, CUDA0, CUDA3 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 3)
TOO_FEW = "each process needs a GPU of its own"


@pytest.mark.parametrize("requested, local_rank, local_world_size, gpus, expected", [
    ("auto", 0, 1, 0, CPU),            # no GPU: the CPU
    ("auto", 0, 4, 0, CPU),
    ("auto", 0, 1, 1, CUDA0),          # one process per GPU: cuda:LOCAL_RANK
    ("auto", 3, 4, 4, CUDA3),
    ("auto", 3, 4, 8, CUDA3),          # more GPUs than processes is fine
    ("auto", 0, 4, 1, TOO_FEW),        # some GPUs, fewer than processes: refused, on every rank
    ("auto", 3, 4, 2, TOO_FEW),
    ("cpu", 0, 4, 1, CPU),             # --device cpu never looks at the GPUs
    ("cpu", 0, 1, 8, CPU),
    ("cuda", 1, 2, 2, torch.device("cuda", 1)),
    ("cuda", 0, 4, 1, TOO_FEW),
    ("cuda", 0, 1, 0, "no CUDA device is visible"),
    ("tpu", 0, 1, 0, "choose one of auto, cuda, cpu"),
    ("auto", 2, 2, 2, "outside this node's 2 processes"),
])
def test_choose_device(requested, local_rank, local_world_size, gpus, expected):
    if isinstance(expected, torch.device):
        assert choose_device(requested, local_rank, local_world_size, gpus) == expected
        return
    with pytest.raises(DeviceUnavailable, match=re.escape(expected)) as error:
        choose_device(requested, local_rank, local_world_size, gpus)
    assert "\n" not in str(error.value)
    if expected == TOO_FEW:  # says what is wrong and both ways out
        assert f"{local_world_size} processes on this node but {gpus} visible GPU" in str(error.value)
        assert "--device cpu" in str(error.value) and "CUDA_VISIBLE_DEVICES=" in str(error.value)


def test_process_group_backend_follows_the_device():
    assert process_group_backend(CPU) == "gloo" and process_group_backend(CUDA0) == "nccl"


def test_device_flag_defaults_to_auto():
    assert parse_args([]).training.device == "auto"
    assert parse_args(["--device", "cpu"]).training.device == "cpu"


def _readme_torchrun_commands() -> list[list[str]]:
    from test_docs import shell_blocks
    commands = []
    for block in shell_blocks("README.md"):
        for line in block.replace("\\\n", " ").splitlines():
            if "torchrun" in line:
                commands.append(shlex.split(line[line.index("torchrun"):].split("&&")[0]))
    return commands


def test_readme_commands_run_on_a_one_gpu_machine():
    """The README's runnable torchrun commands pass the device check on a machine with one GPU
    (and with none), every local rank, at their process count; and parse at that world size."""
    commands = _readme_torchrun_commands()
    assert len(commands) >= 2
    for command in commands:
        nproc = int(command[command.index("--nproc_per_node") + 1])
        flags = command[command.index("pretrain_gpt.py") + 1:]
        cfg = parse_args(flags, world_size=nproc)
        for gpus in (0, 1):
            assert all(choose_device(cfg.training.device, r, nproc, gpus) == CPU for r in range(nproc)), command


def _fake_one_gpu_env(tmp_path) -> dict:
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True  # a machine with one GPU, as far as megalite can tell\n"
        "torch.cuda.device_count = lambda: 1\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), ROOT, os.environ.get("PYTHONPATH", "")])}


FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--vocab-size", "100", "--eval-interval", "0",
         "--log-interval", "1", "--train-iters", "2", "--tensor-model-parallel-size", "2"]


def test_more_processes_than_gpus_stops_with_one_line(tmp_path):
    """Two local processes on a (faked) one-GPU node: one line from local rank 0, nothing from
    local rank 1, both exit 2 before any process group; no traceback, no CUDA call."""
    env = _fake_one_gpu_env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "pretrain_gpt.py", *FLAGS], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "RANK": str(r),
                                   "WORLD_SIZE": "2"})
             for r in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], outs
    (out0, err0), (out1, err1) = outs
    assert out0 == out1 == err1 == "", outs
    assert err0 == ("pretrain_gpt.py: error: 2 processes on this node but 1 visible GPU: each process needs a GPU "
                    "of its own. Start at most 1 per node (torchrun --nproc_per_node 1), or train on the CPU: "
                    "add --device cpu (or set CUDA_VISIBLE_DEVICES=)\n")


def test_device_cpu_trains_on_a_gpu_machine(tmp_path):
    """The same two processes with --device cpu train under torchrun (gloo, not NCCL) on the
    (faked) one-GPU node, and save a checkpoint without asking CUDA for its RNG state."""
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "pretrain_gpt.py", *FLAGS, "--device", "cpu", "--save", save]
    out = subprocess.run(cmd, cwd=ROOT, env=_fake_one_gpu_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "; device cpu" in out.stdout and re.search(r"iteration\s+2/\s+2 \|", out.stdout), out.stdout[-2000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
