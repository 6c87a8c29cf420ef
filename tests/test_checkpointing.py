"""Checkpoints: exact resume, resharding across layouts, atomicity and verification."""
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from equivalence import BF16, FP32, TINY, assert_tensors_close, run_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # RNG state must be restored too
BASE = TINY + DROPOUT + ["--train-iters", "12", "--lr-decay-style", "linear"]
TP, PP, VPP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage"


def train(argv, world):
    return run_layout(argv, world)


def assert_identical(a: dict, b: dict) -> None:
    """Two gathered weight sets equal bit for bit."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _straight_and_resumed(tmp_path, layout, world):
    save = str(tmp_path / "ckpt")
    straight = train(BASE + layout, world)
    first = train(BASE + layout + ["--save", save, "--exit-interval", "6"], world)
    second = train(BASE + layout + ["--load", save, "--save", save], world)
    assert len(first["loss"]) == 6 and len(second["loss"]) == 6
    assert_identical(second["params_0"], first["params"])  # loaded == saved
    assert first["loss"] + second["loss"] == straight["loss"]  # bit-identical, dropout included
    assert_identical(second["params"], straight["params"])
    return straight, first, second


def test_resume_is_exact_single_process(tmp_path):
    straight, first, second = _straight_and_resumed(tmp_path, [], 1)
    assert any("loaded checkpoint" in line for line in second["lines"])
    assert os.path.exists(tmp_path / "ckpt" / "iter_0000012" / "manifest.json")
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "12"


@pytest.mark.slow
def test_resume_is_exact_3d_distributed_optimizer(tmp_path):
    _straight_and_resumed(tmp_path, [TP, "2", PP, "2", "--use-distributed-optimizer"], 8)


NODROP = TINY + ["--train-iters", "12", "--lr-decay-style", "linear"]  # RNG cannot carry across layouts
EP = "--expert-model-parallel-size"
MOE_BIASED = ["--num-experts", "4", "--moe-ffn-hidden-size", "64", "--moe-aux-loss-coeff", "1e-2",
              "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]  # the bias is resumed too


@pytest.mark.parametrize("flags,src,src_world,dst,dst_world,tol", [
    ([], [TP, "2", PP, "2"], 4, ["--use-distributed-optimizer"], 2, FP32),
    ([], ["--use-distributed-optimizer"], 2, [TP, "2", PP, "2"], 4, FP32),
    (["--swiglu", "--lr", "0.03"], [TP, "2"], 2, [], 1, FP32),  # SwiGLU fc1 weight *and bias* are [gate_r; up_r]
    (["--num-layers", "8"], [PP, "2", VPP, "2"], 2, [TP, "2"], 2, FP32),  # virtual chunks -> TP
    (["--bf16"], [TP, "2"], 2, [PP, "2", "--use-distributed-optimizer"], 4, BF16),
    ([], ["--context-parallel-size", "2", "--use-distributed-optimizer"], 4, [TP, "2", PP, "2"], 4, FP32),
    (MOE_BIASED, [TP, "2", "--sequence-parallel", EP, "2", "--use-distributed-optimizer"], 4,
     [EP, "4", "--moe-token-dispatcher-type", "alltoall"], 4, FP32),  # experts: EP and expert-TP both change
], ids=["tp2pp2-to-distopt", "distopt-to-tp2pp2", "swiglu-tp2-to-1", "vpp-to-tp2", "bf16-tp2-to-pp2-distopt",
        "cp2-dp2-distopt-to-tp2pp2", "moe-tp2-ep2-distopt-to-ep4"])
def test_reshard_continues_like_the_original_layout(tmp_path, flags, src, src_world, dst, dst_world, tol):
    """Loaded == saved (every weight, bit for bit, at the new layout), then the run goes on as
    the uninterrupted run at the original layout: losses, grad norms and weights."""
    save = str(tmp_path / "ckpt")
    straight = train(NODROP + flags + src, src_world)
    first = train(NODROP + flags + src + ["--save", save, "--exit-interval", "6"], src_world)
    resumed = train(NODROP + flags + dst + ["--load", save], dst_world)
    assert len(straight["loss"]) == 12 and len(first["loss"]) == len(resumed["loss"]) == 6
    assert_identical(resumed["params_0"], first["params"])
    for i, (a, b) in enumerate(zip(straight["loss"][6:], resumed["loss"])):
        assert abs(a - b) <= tol.loss_rtol * a, (i, straight["loss"][6:], resumed["loss"])
    for i, (a, b) in enumerate(zip(straight["grad_norm"][6:], resumed["grad_norm"])):
        assert abs(a - b) <= tol.norm_rtol * a, (i, straight["grad_norm"][6:], resumed["grad_norm"])
    if tol.param_rtol is not None:
        assert_tensors_close(straight["params"], resumed["params"], tol.param_rtol,
                             tol.param_atol_lr * max(straight["lr"]), "params at the end")


def _save_once(tmp_path, iters="10"):
    save = str(tmp_path / "ckpt")
    train(TINY + ["--train-iters", iters, "--save", save, "--save-interval", "5"], 1)
    return save


def _load(save, extra=()):
    got = train(TINY + ["--train-iters", "12", "--load", save] + list(extra), 1)
    if got["error"]:
        raise RuntimeError(got["error"])
    return got


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    save = _save_once(tmp_path)
    model_file = os.path.join(save, "iter_0000010", "shard_00000.pt")  # rank 0's params and optimizer state
    data = open(model_file, "rb").read()
    open(model_file, "wb").write(data[:-100])
    with pytest.raises(RuntimeError, match=r"shard_00000.pt is truncated"):
        _load(save)
    open(model_file, "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RuntimeError, match=r"shard_00000.pt is corrupted"):
        _load(save)
    os.remove(model_file)
    with pytest.raises(RuntimeError, match=r"checkpoint file missing: .*shard_00000.pt"):
        _load(save)


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path):
    save = _save_once(tmp_path)
    # A crash in the middle of saving iteration 15: its temp dir exists, the tracker still says 10.
    partial = os.path.join(save, ".iter_0000015.tmp")
    os.makedirs(partial)
    open(os.path.join(partial, "shard_00000.pt"), "wb").write(b"half a file")
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "10"
    resumed = _load(save)
    assert len(resumed["loss"]) == 2  # iterations 11 and 12


def test_keep_last_and_finetune(tmp_path):
    save = str(tmp_path / "ckpt")
    trained = train(TINY + ["--train-iters", "10", "--save", save, "--save-interval", "2", "--keep-last", "2"], 1)
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == ["iter_0000008", "iter_0000010"]
    tuned = train(TINY + ["--train-iters", "3", "--load", save, "--finetune"], 1)
    fresh = train(TINY + ["--train-iters", "3"], 1)
    assert_identical(tuned["params_0"], trained["params"])  # starts from the trained weights
    assert len(tuned["loss"]) == 3 and tuned["loss"][0] < fresh["loss"][0]
    assert tuned["lr"] == fresh["lr"]  # at iteration 0 of the schedule


def test_model_mismatch_is_reported(tmp_path):
    save = _save_once(tmp_path)
    with pytest.raises(RuntimeError, match=r"--hidden-size: checkpoint 32, now 64"):
        _load(save, ["--hidden-size", "64"])


LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: ([0-9.E+-]+) \|")


def _torchrun(args, extra_torchrun=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra_torchrun,
           os.path.join(ROOT, "pretrain_gpt.py"), *args]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, no orphans.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return out, {int(m.group(1)): m.group(2) for m in LOSS_RE.finditer(out.stdout)}


@pytest.mark.slow
def test_auto_resume_after_injected_fault_with_torchrun(tmp_path):
    args = TINY + ["--train-iters", "16", "--tensor-model-parallel-size", "2", "--global-batch-size", "4"]
    out, straight = _torchrun(args)
    assert out.returncode == 0, out.stderr[-3000:]
    save = str(tmp_path / "ckpt")
    faulty = args + ["--save", save, "--load", save, "--save-interval", "5", "--inject-fault-at-iteration", "12",
                     "--inject-fault-rank", "1"]
    out, resumed = _torchrun(faulty, ["--max-restarts", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "injected fault: rank 1 exits after iteration 12" in out.stdout
    # The restarted attempt loaded iteration 10's checkpoint (not just saved it).
    assert re.search(r"> loaded checkpoint \S*iter_0000010 \(iteration 10,", out.stdout), out.stdout[-3000:]
    assert resumed[16] == straight[16] and resumed[11] == straight[11]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """--exit-signal-handler: SIGTERM mid-run -> checkpoint after the current iteration, exit 0."""
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--train-iters", "100000",
           "--save", save, "--exit-signal-handler"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    watchdog = threading.Timer(300, proc.kill)  # a hang fails the test instead of blocking CI
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if LOSS_RE.search(line) and len([x for x in lines if LOSS_RE.search(x)]) == 3:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text[-2000:]
    assert "exiting after iteration" in text and "(SIGTERM)" in text
    saved = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert 3 <= saved < 100000
    assert os.path.exists(os.path.join(save, f"iter_{saved:07d}", "manifest.json"))


@pytest.mark.parametrize("problem", ["missing-data", "truncated-checkpoint"])
def test_user_facing_errors_are_one_line_naming_the_file(tmp_path, problem):
    """pretrain_gpt.py: one `megalite: error: ...` line naming the file, exit code 1, no traceback
    (MEGALITE_DEBUG=1 shows it)."""
    args = TINY + ["--train-iters", "2"]
    if problem == "missing-data":
        culprit = str(tmp_path / "corpus_text_document")
        args = [a for a in args if a != "--mock-data"] + ["--data-path", culprit, "--tokenizer-type", "ByteTokenizer"]
    else:
        save = _save_once(tmp_path)
        culprit = os.path.join(save, "iter_0000010", "shard_00000.pt")
        open(culprit, "r+b").truncate(100)
        args += ["--load", save]
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith("megalite: error: ") and culprit in errors[0]
    debug = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "MEGALITE_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
