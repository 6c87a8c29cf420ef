"""Non-finite grads never reach the weights, in any precision, and the run stops on a NaN streak.

An inf/NaN grad anywhere skips the update on every rank (params, fp32 main params and Adam state
bit-identical, the LR schedule not advanced), counts as a nan iteration and is logged with the
first parameter whose grad is not finite; ``--max-consecutive-nan-iterations`` such iterations in
a row stop the run (exit code 1 under pretrain_gpt.py) without writing a checkpoint.
"""
import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed_helper import run_distributed
from equivalence import TINY, assert_equivalent, inject_grad, iteration_lines, run_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
PRECISIONS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}
EXPLODING = ["--init-method-std", "1e20", "--max-consecutive-nan-iterations", "3"]  # NaN from iteration 1


@pytest.mark.parametrize("layout", [TP2, PP2], ids=["tp2", "pp2"])
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_a_nan_streak_stops_the_run_without_saving(precision, layout, tmp_path):
    save = str(tmp_path / "ckpt")
    got = run_layout(TINY + PRECISIONS[precision] + layout + EXPLODING + ["--save", save, "--save-interval", "1"], 2)
    # Every rank raised the same error at the same iteration, naming where the NaNs start.
    assert got["error"] == (
        "NonFiniteGradientsError: iteration 3: 3 iterations in a row (1 to 3) had non-finite gradients; the "
        "first non-finite gradient of iteration 1 was in word_embeddings.weight. Their updates were skipped "
        "and no checkpoint was written from iteration 1 on. Stopping (--max-consecutive-nan-iterations 3).")
    assert all(r["iteration"] == 3 for r in got["per_rank"])
    assert not os.path.exists(save) or os.listdir(save) == []
    for name, before in got["params_0"].items():  # no update reached any weight, on any rank
        assert np.array_equal(before, got["params"][name], equal_nan=True), name
    rank0 = got["per_rank"][0]["lines"]
    assert [line.split(":")[0] for line in rank0 if "non-finite gradients" in line] == [
        "> iteration 1", "> iteration 2", "> iteration 3"]
    assert sum("no checkpoint saved" in line for line in rank0) == 2


def test_fp16_at_the_minimum_loss_scale_is_a_nan_iteration_not_an_overflow():
    """An inf the dynamic scaler cannot answer (scale already at its minimum, 1) counts."""
    inject = functools.partial(inject_grad, iteration=None, on_rank=0)
    got = run_layout(TINY + ["--fp16", "--initial-loss-scale", "1", "--max-consecutive-nan-iterations", "2"],
                     1, inject=inject)
    assert got["error"].startswith("NonFiniteGradientsError: iteration 2: 2 iterations in a row (1 to 2)")
    assert "was in layers.0.mlp.fc1.weight" in got["error"]


def test_one_nan_iteration_is_skipped_everywhere_and_training_goes_on():
    """A NaN in one stage's grad at iteration 3 (PP2 x DP2): all 4 ranks skip it, and the run
    then equals the serial run with the same NaN, grads and weights included; it is counted."""
    ref = run_layout(TINY, 1, inject=functools.partial(inject_grad, iteration=3, on_rank=0, value=math.nan,
                                                       name="layers.3.mlp.fc1.weight"))
    got = run_layout(TINY + PP2, 4, inject=functools.partial(inject_grad, iteration=3, on_rank=2, value=math.nan,
                                                             name="layers.3.mlp.fc1.weight"))
    assert_equivalent(ref, got)
    for run in (ref, got):
        assert [h["updated"] for h in run["per_rank"][-1]["history"]] == [True, True, False, True, True, True]
        lines = iteration_lines(run)
        assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in lines[-1]
        assert "lm loss: NAN" in lines[2] and "lm loss: NAN" not in lines[3]  # the loss of iteration 3 only
    assert any(line.startswith("> iteration 3: non-finite gradients (first in layers.3.mlp.fc1.weight)")
               for line in got["per_rank"][0]["lines"])  # rank 0 logs it although stage 1 saw the NaN


def _state(trainer):
    opt = trainer.optimizer
    return ([t.clone() for t in trainer.buffer.param_data.split(1000)],
            [f.main.detach().clone() for f in opt.fragments],
            [{k: v.clone() for k, v in opt.optimizer.state[f.main].items()} for f in opt.fragments],
            trainer.scheduler.num_steps, opt.num_updates)


def _skip_keeps_every_state(rank, world, argv):
    from megalite.config import parse_args
    from megalite.data.mock_dataset import MockGPTDataset
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_config(cfg)
    trainer = Trainer(cfg, ps, vocab_size=100, log=lambda m: None)
    batches = BatchIterator(MockGPTDataset(200, 16, 100), cfg, ps)
    for _ in range(2):
        assert trainer.train_step(batches.next_microbatches(cfg.num_microbatches))["updated"]
    before = _state(trainer)
    inject_grad(trainer, rank, iteration=3, on_rank=world - 1, value=math.nan, name="layers.1.norm_1.weight")
    stats = trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    after = _state(trainer)
    same = (all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            and all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
            and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before[2], after[2]))
            and before[3:] == after[3:])
    return {"lr": stats["lr"], "updated": stats["updated"], "same": same, "nan": trainer.nan_iterations,
            "next": trainer.train_step(batches.next_microbatches(cfg.num_microbatches))["updated"]}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_a_skipped_step_leaves_params_main_params_and_adam_state_bit_identical(precision):
    """At lr > 0 (a skip at lr 0 would prove nothing), TP2 with the distributed optimizer over DP2."""
    argv = TINY + PRECISIONS[precision] + TP2 + ["--use-distributed-optimizer", "--initial-loss-scale", "1024"]
    for r in run_distributed(_skip_keeps_every_state, 4, argv):
        assert r["lr"] > 0 and r["updated"] is False and r["same"] and r["next"] is True
        assert r["nan"] == (0 if precision == "fp16" else 1)  # fp16: an overflow the scaler answers


def test_pretrain_gpt_exits_with_code_1_and_one_message(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_gpt.py"), *TINY, *TP2, *EXPLODING, "--bf16", "--save", save,
           "--save-interval", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("megalite: error:")]
    assert len(errors) == 1 and "iteration 3: 3 iterations in a row" in errors[0]
    assert "word_embeddings.weight" in errors[0]
    assert "saved checkpoint" not in out.stdout and not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
