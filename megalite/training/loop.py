"""The training loop: load, iterate, log, evaluate, save, stop.

``pretrain(cfg, pstate, datasets, vocab_size)`` is everything ``pretrain_gpt.py`` does after
argument parsing and data building; :func:`train` runs the loop for an already built
:class:`~megalite.training.trainer.Trainer` (so that a caller can wrap it first).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time

import torch
import torch.distributed as dist

from ..checkpointing import Checkpointer, load_checkpoint
from ..config import Config
from ..model import document_attention
from ..optimizer.nonfinite import NonFiniteGradientsError
from ..parallel_state import ParallelState
from .batches import BatchIterator
from .log_line import format_iteration_line, format_validation_line
from .monitoring import MOE_LOSS_NAMES, TrainingMonitor
from .stop import StopConditions
from .trainer import Trainer


def check_same_flags_on_all_ranks(cfg: Config) -> None:
    """Raise on every rank, naming the ranks and flags, when ranks were launched with different flags.

    Nodes started from different scripts would otherwise build different process groups or
    models and hang in a collective, exchange p2p tensors of different sizes (gloo fills a
    larger receive buffer only partly, silently), or simply train on (e.g. a different --lr).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flags = {f"--{name.replace('_', '-')}": value for section in dataclasses.asdict(cfg).values()
             if isinstance(section, dict) for name, value in section.items()}
    everyone = [None] * dist.get_world_size()
    digest = hashlib.md5(repr(sorted(flags.items())).encode()).hexdigest()  # (hash() differs per process)
    dist.all_gather_object(everyone, digest)  # small, also with thousands of ranks
    if len(set(everyone)) == 1:
        return
    dist.all_gather_object(everyone, flags)  # they differ: gather the flags to say which
    differing = {rank: [f"{k} {v!r} (rank 0: {everyone[0].get(k)!r})" for k, v in theirs.items()
                        if everyone[0].get(k) != v] for rank, theirs in enumerate(everyone)}
    differing = {rank: diffs for rank, diffs in differing.items() if diffs}
    if differing:
        shown = "; ".join(f"rank {rank}: {', '.join(diffs)}" for rank, diffs in list(differing.items())[:8])
        raise ValueError(f"ranks {sorted(differing)} were launched with different flags than rank 0: {shown}")


def pretrain(cfg: Config, pstate: ParallelState, datasets, vocab_size: int, device=torch.device("cpu"),
             log=print) -> list[dict]:
    """Train for ``--train-iters`` iterations; return per-iteration stats (``loss``, ``grad_norm``,
    ``lr``). The loss is known on the logging rank (last stage); elsewhere it is NaN."""
    check_same_flags_on_all_ranks(cfg)
    return train(Trainer(cfg, pstate, vocab_size, device, log), datasets)


def train(trainer: Trainer, datasets) -> list[dict]:
    """The loop of :func:`pretrain` for a built ``trainer``: load, iterate, log, evaluate, save.

    Raises :class:`~megalite.optimizer.nonfinite.NonFiniteGradientsError` after
    ``--max-consecutive-nan-iterations`` iterations in a row with non-finite grads; no
    checkpoint is written during such a streak."""
    cfg, lg = trainer.cfg, trainer.cfg.logging
    _log_memory(trainer)
    _log_document_attention(trainer)
    if lg.load:
        load_checkpoint(trainer, lg.load, finetune=lg.finetune, load_optim=not lg.no_load_optim,
                        load_rng=not lg.no_load_rng, log=trainer.log)
    train_batches, valid_batches = _batch_iterators(trainer, datasets)
    stop = StopConditions(cfg, trainer.device)
    checkpointer = (Checkpointer(lg.save, lg.keep_last, lg.async_save, trainer.log, trainer.device)
                    if lg.save else None)
    try:
        history = _iterate(trainer, train_batches, valid_batches, stop, checkpointer)
    except NonFiniteGradientsError:  # on every rank at once: a save still being written is committed
        if checkpointer is not None:
            checkpointer.finalize()
        raise
    if checkpointer is not None:
        if trainer.iteration > 0 and checkpointer.saved_iteration != trainer.iteration:
            _save_unless_nonfinite(trainer, checkpointer)
        checkpointer.finalize()
    if trainer.timeline is not None:
        trainer.timeline.save(lg.timeline_file)
    return history


def _iterate(trainer: Trainer, train_batches: BatchIterator, valid_batches: BatchIterator | None,
             stop: StopConditions, checkpointer: Checkpointer | None) -> list[dict]:
    """Train up to ``--train-iters`` (or an exit decision); per-iteration stats."""
    cfg, lg, t = trainer.cfg, trainer.cfg.logging, trainer.cfg.training
    monitor = TrainingMonitor(cfg, enabled=trainer.is_logging_rank, world_size=trainer.pstate.world_size,
                              flops_per_iteration=trainer.flops_per_iteration(),
                              model_flops_per_iteration=trainer.flops_per_iteration(include_recompute=False),
                              device=trainer.device, log=trainer.log)
    history: list[dict] = []
    window = LogWindow(trainer, monitor)
    for _ in range(trainer.iteration, t.train_iters):
        start = time.perf_counter()
        stats = trainer.train_step(train_batches.next_microbatches(cfg.num_microbatches))
        seconds = time.perf_counter() - start
        history.append({**stats, "loss": stats["loss"] if trainer.is_logging_rank else math.nan})
        it = trainer.iteration
        monitor.iteration(it, stats, seconds)  # TensorBoard / W&B scalars (logging rank only)
        window.add(stats, seconds)
        if it % lg.log_interval == 0 or it == t.train_iters:
            window.flush(it, stats)
        if valid_batches is not None and lg.eval_interval and it % lg.eval_interval == 0 and lg.eval_iters > 0:
            _validate(trainer, valid_batches, monitor)
        if checkpointer is not None:
            checkpointer.poll()  # commits an asynchronous save once every rank has written it
        decision = stop.poll(it)
        if decision.save and checkpointer is not None:
            _save_unless_nonfinite(trainer, checkpointer)
        if decision.exit_reason:
            trainer.log(f"> exiting after iteration {it} ({decision.exit_reason})") if trainer.pstate.rank == 0 else None
            break
    monitor.close()
    return history


class LogWindow:
    """The iterations since the last log line: their time, and the losses of those that updated
    (as Megatron, skipped iterations -- no loss token, inf/NaN -- are not averaged)."""

    def __init__(self, trainer: Trainer, monitor: TrainingMonitor):
        self.trainer, self.monitor = trainer, monitor
        self.losses, self.seconds, self.iterations, self.extra = [], 0.0, 0, {}

    def add(self, stats: dict, seconds: float) -> None:
        self.seconds, self.iterations = self.seconds + seconds, self.iterations + 1
        if stats["updated"]:
            self.losses.append(stats["loss"])
            for key, name in MOE_LOSS_NAMES.items():  # MoE models: averaged over the window too
                if key in stats:
                    self.extra.setdefault(name, []).append(stats[key])

    def flush(self, iteration: int, stats: dict) -> None:
        """Print the log line and the progress line (logging rank only); start a new window."""
        trainer, t = self.trainer, self.trainer.cfg.training
        elapsed = self.seconds / self.iterations
        if trainer.is_logging_rank:
            tflops = trainer.flops_per_iteration() / (elapsed * 1e12 * trainer.pstate.world_size)
            loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
            trainer.log(format_iteration_line(iteration, t.train_iters, trainer.consumed_samples, elapsed * 1000.0,
                                              tflops, stats["lr"], t.global_batch_size, loss, stats["loss_scale"],
                                              stats["grad_norm"], trainer.skipped_iterations, trainer.nan_iterations,
                                              {k: sum(v) / len(v) for k, v in self.extra.items()}))
            trainer.log(self.monitor.progress_line(iteration, elapsed))  # tokens/s, MFU, ETA: a line of its own
        self.losses, self.seconds, self.iterations, self.extra = [], 0.0, 0, {}


def _log_memory(trainer: Trainer) -> None:
    if trainer.pstate.rank == 0:
        report = trainer.optimizer.memory_report()
        trainer.log("> memory per parameter on rank 0 (bytes): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["per_param"].items()) +
            f" | total {sum(report['per_param'].values()):.2f}"
            + (f" (distributed optimizer over {trainer.pstate.dp_cp_size} ranks)"
               if trainer.optimizer.distributed else ""))


def _log_document_attention(trainer: Trainer) -> None:
    """With --reset-attention-mask: one line saying which attention kernel the documents take, and why."""
    if trainer.cfg.data.reset_attention_mask and trainer.pstate.rank == 0:
        trainer.log(document_attention.startup_line(trainer.cfg.model, trainer.device, trainer.dtype,
                                                    trainer.pstate.cp_size))


def _batch_iterators(trainer: Trainer, datasets) -> tuple[BatchIterator, BatchIterator | None]:
    """The train and validation iterators, at the trainer's position (after a resume)."""
    train_ds, valid_ds, _ = datasets
    train_batches = BatchIterator(train_ds, trainer.cfg, trainer.pstate, trainer.consumed_samples, trainer.device)
    valid_batches = None
    if valid_ds is not None and len(valid_ds) > 0:  # (a weighted blend without validation samples is empty)
        valid_batches = BatchIterator(valid_ds, trainer.cfg, trainer.pstate, trainer.consumed_valid_samples,
                                      trainer.device, cycle=True)
    return train_batches, valid_batches


def _validate(trainer: Trainer, batches: BatchIterator, monitor: TrainingMonitor) -> None:
    loss = trainer.evaluate(batches, trainer.cfg.logging.eval_iters)
    if trainer.is_logging_rank:
        trainer.log(format_validation_line(f"iteration {trainer.iteration}", loss))
        monitor.validation(trainer.iteration, loss)


def _save_unless_nonfinite(trainer: Trainer, checkpointer: Checkpointer) -> None:
    """Save a checkpoint, except during a streak of non-finite iterations (said in the log)."""
    if not trainer.nan_streak.active:
        checkpointer.save(trainer)
    elif trainer.pstate.rank == 0:
        trainer.log(f"> iteration {trainer.iteration}: no checkpoint saved: the gradients have been non-finite "
                    f"since iteration {trainer.nan_streak.first_iteration}")
