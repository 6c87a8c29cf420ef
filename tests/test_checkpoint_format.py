"""The sharded checkpoint format: each rank writes only its share, asynchronous saves survive a
kill -9, loading runs no code from a file, and format-1 checkpoints still load."""
import functools
import json
import os
import signal

import numpy as np
import pytest
import torch

from equivalence import TINY, run_layout

DP_OPT = ["--use-distributed-optimizer"]


def train(argv, world, inject=None):
    return run_layout(argv, world, inject=inject)


def _shards(save: str, iteration: int) -> dict:
    directory = os.path.join(save, f"iter_{iteration:07d}")
    return {name: torch.load(os.path.join(directory, name), weights_only=True)
            for name in sorted(os.listdir(directory)) if name.startswith("shard_")}


@pytest.mark.parametrize("flags,kinds", [(DP_OPT, {"param", "exp_avg", "exp_avg_sq"}),
                                         (["--bf16"], {"param", "main", "exp_avg", "exp_avg_sq"})],
                         ids=["fp32-distopt", "bf16-replicated-optimizer"])
def test_each_rank_writes_its_share_once(tmp_path, flags, kinds):
    """DP2: the two ranks' files hold disjoint halves of every kind of state, together every
    element exactly once; the DP ranks share the writing also when each holds all the state."""
    save = str(tmp_path / "ckpt")
    run = train(TINY + flags + ["--train-iters", "2", "--save", save], 2)
    numel = sum(v.size for v in run["params"].values())
    shards = _shards(save, 2)
    assert sorted(shards) == ["shard_00000.pt", "shard_00001.pt"]
    per_rank = [{k: sum(t.numel() for key, t in s["tensors"].items() if key.split(":")[1] == k) for k in kinds}
                for s in shards.values()]
    padded_vocab_rows = 128 - 100  # the embedding's padding rows are stored too (they are state)
    for kind in kinds:
        assert per_rank[0][kind] + per_rank[1][kind] == numel + padded_vocab_rows * 32, kind
        assert abs(per_rank[0][kind] - per_rank[1][kind]) <= 0.1 * numel, kind  # about half each
    index = json.load(open(os.path.join(save, "iter_0000002", "index.json")))
    assert sorted(index) == sorted(run["params"])


def _die_while_writing(trainer, rank, iteration):
    """In the spawned run: the write of ``iteration``'s checkpoint dies half-way (kill -9)."""
    from megalite.checkpointing import sharded
    write = sharded.write_shard

    def write_or_die(tmp, r, tensors, rng):
        if tmp.endswith(f".iter_{iteration:07d}.tmp"):
            with open(os.path.join(tmp, sharded.shard_file(r)), "wb") as f:
                f.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return write(tmp, r, tensors, rng)
    sharded.write_shard = write_or_die


def test_async_save_killed_during_the_write_resumes_from_the_previous_one(tmp_path):
    """--async-save: a checkpoint is committed (tracker) only after its files are written and read
    back; a kill -9 in the middle of the next write leaves the previous checkpoint, and resuming
    from it gives the uninterrupted run bit for bit."""
    flags = TINY + ["--train-iters", "9", "--hidden-dropout", "0.1"]
    straight = train(flags, 1)
    save = str(tmp_path / "ckpt")
    saving = flags + ["--save", save, "--save-interval", "3", "--async-save"]
    with pytest.raises(RuntimeError, match="died with exit code -9"):
        train(saving, 1, inject=functools.partial(_die_while_writing, iteration=6))
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "3"
    assert os.path.exists(os.path.join(save, ".iter_0000006.tmp"))  # the half-written one, never committed
    resumed = train(saving + ["--load", save], 1)
    assert resumed["error"] is None and len(resumed["loss"]) == 6
    assert resumed["loss"] == straight["loss"][3:]
    for name, value in straight["params"].items():
        assert np.array_equal(resumed["params"][name], value), name
    lines = resumed["lines"]
    saved_6 = lines.index(next(x for x in lines if "saved checkpoint at iteration 6" in x))
    at_7 = lines.index(next(x for x in lines if x.startswith(" iteration        7/")))
    assert saved_6 > at_7  # asynchronous: committed while iteration 7 ran, not before it


class _Payload:
    """What an attacker would hide in a checkpoint: code run at unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    from megalite.checkpointing.store import file_digest

    save = str(tmp_path / "ckpt")
    train(TINY + ["--train-iters", "2", "--save", save], 1)
    directory = os.path.join(save, "iter_0000002")
    shard, marker = os.path.join(directory, "shard_00000.pt"), str(tmp_path / "pwned")
    torch.save({"tensors": {}, "rng": _Payload(marker)}, shard)
    manifest = json.load(open(os.path.join(directory, "manifest.json")))  # the attacker fixes the hashes too
    manifest["shard_00000.pt"] = {"bytes": os.path.getsize(shard), "sha256": file_digest(shard)}
    json.dump(manifest, open(os.path.join(directory, "manifest.json"), "w"))
    got = train(TINY + ["--train-iters", "3", "--load", save], 1)
    assert got["error"].startswith(f"ValueError: checkpoint file {shard} holds more than tensors and plain data")
    assert not os.path.exists(marker)  # nothing in it ran


def _write_format_1(trainer, root: str) -> None:
    """A format-1 checkpoint of a single-process trainer, written as megalite did before the sharded
    format (per-(tp, pp) model file, common.pt, rng file, manifest), for the legacy reader."""
    import random

    from megalite.checkpointing import store
    from megalite.checkpointing.format import shard_meta
    from megalite.model import named_global_parameters

    tmp, opt = store.begin(root, trainer.iteration), trainer.optimizer
    state = opt.state_dict()["fragments"]
    model = {name: {"tensor": p.detach().clone(), **shard_meta(p, 0, 1),
                    **{k: state[name][k].view_as(p).clone() for k in ("main", "exp_avg", "exp_avg_sq")}}
             for name, p in named_global_parameters(trainer.model)}
    common = {**trainer.state_dict(), "scheduler": trainer.scheduler.state_dict(), "scaler": opt.scaler.state_dict(),
              "adam_step": opt.num_updates, "config": __import__("dataclasses").asdict(trainer.cfg),
              "layout": {"tp": 1, "pp": 1, "dp": 1, "cp": 1, "world": 1, "chunks": 1, "distributed_optimizer": False}}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tracker": trainer.tracker.state_dict()}
    manifest = {name: store.save_file(obj, os.path.join(tmp, name)) for name, obj in
                (("model_tp00_pp00.pt", model), ("common.pt", common), ("rng_rank00000.pt", rng))}
    store.commit(root, trainer.iteration, tmp, manifest)


def _train_then_write_format_1(rank, world, argv, root):
    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_config(cfg)
    (train_ds, _, _), vocab = build_datasets(cfg, log=lambda m: None)
    trainer = Trainer(cfg, ps, vocab, log=lambda m: None)
    batches = BatchIterator(train_ds, cfg, ps)
    for _ in range(3):
        trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    _write_format_1(trainer, root)


def test_format_1_checkpoints_still_load_exactly(tmp_path):
    from distributed_helper import run_distributed

    flags = TINY + ["--train-iters", "6", "--hidden-dropout", "0.1", "--bf16"]
    straight = train(flags, 1)
    root = str(tmp_path / "old")
    run_distributed(_train_then_write_format_1, 1, flags, root)
    resumed = train(flags + ["--load", root], 1)
    assert resumed["error"] is None and resumed["loss"] == straight["loss"][3:]
    for name, value in straight["params"].items():
        assert np.array_equal(resumed["params"][name], value), name
    resharded = train(flags + ["--load", root, "--tensor-model-parallel-size", "2"], 2)
    assert resharded["error"] is None and len(resharded["loss"]) == 3
