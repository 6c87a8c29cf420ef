"""The training loop: micro-batches -> pipeline schedule -> grad sync -> clip -> optimizer step.

``pretrain(cfg, pstate, datasets, vocab_size)`` is everything ``pretrain_gpt.py`` does after
argument parsing and data building. One iteration (:func:`train_step`)::

    micro-batches of this DP rank -> schedule (forward/backward, p2p between stages)
    -> finalize_model_grads (DP, tied embedding, SP norms) -> grad norm -> clip -> step
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from .config import Config
from .data.samplers import MegatronPretrainingSampler
from .distributed.finalize import finalize_model_grads, tied_embedding_params
from .distributed.grad_buffer import GradBuffer
from .flops import model_flops_per_iteration
from .checkpoint_format import global_name
from .checkpointing import load_checkpoint, read_tracker, save_checkpoint
from .model import build_model
from .monitoring import TrainingMonitor
from .model.context_parallel import get_batch_on_this_cp_rank
from .optimizer import build_optimizer
from .optimizer.lr_scheduler import LRScheduler
from .optimizer.nonfinite import NonFiniteStreak, any_rank
from .parallel_state import ParallelState
from .pipeline_parallel.p2p import P2P
from .pipeline_parallel.schedules import get_schedule
from .pipeline_parallel.timeline import Timeline
from .tensor_parallel import model_parallel_seed
from .training_log import format_iteration_line, format_validation_line


class BatchIterator:
    """This DP rank's micro-batches from ``dataset``, in Megatron's sampler order.

    Every TP/PP rank of a DP rank reads the same samples itself (the datasets are
    deterministic), so no broadcast is needed.
    """

    def __init__(self, dataset, cfg: Config, pstate: ParallelState, consumed_samples: int = 0,
                 device=torch.device("cpu")):
        self.dataset, self.device = dataset, device
        self.cp_rank, self.cp_size = pstate.cp_rank, pstate.cp_size
        self.sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, cfg.training.micro_batch_size,
                                                  pstate.dp_rank, pstate.dp_size)
        self.indices = iter(self.sampler)

    def next_microbatches(self, count: int) -> list[dict]:
        batches = []
        for _ in range(count):
            try:
                idx = next(self.indices)
            except StopIteration:
                raise RuntimeError(f"the dataset ran out of samples ({len(self.dataset)}); "
                                   "lower --train-iters / --eval-iters or use more data") from None
            items = [self.dataset[i] for i in idx]
            # A sample is seq_length + 1 token ids, or a dict {"tokens": those ids, "loss_mask":
            # seq_length weights of the labels} for data that excludes some tokens from the loss.
            masked = isinstance(items[0], dict)
            samples = torch.from_numpy(np.stack([x["tokens"] if masked else x for x in items]).astype(np.int64))
            samples = samples.to(self.device)
            tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
            mask = (torch.from_numpy(np.stack([x["loss_mask"] for x in items]).astype(np.float32)).to(self.device)
                    if masked else torch.ones_like(labels, dtype=torch.float32))
            batch = {"tokens": tokens, "labels": labels, "loss_mask": mask}
            # Context parallel: keep this CP rank's (load-balanced) chunks, with global position ids.
            batches.append(get_batch_on_this_cp_rank(batch, self.cp_rank, self.cp_size))
        return batches


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


def model_order(model_chunks, pstate: ParallelState) -> dict[int, tuple[tuple[int, int], str]]:
    """``id(param) -> ((virtual stage, index in the chunk), global name)``: sorting by the first
    element lists the parameters of the whole model in order, embedding first."""
    order = {}
    for v, chunk in enumerate(model_chunks):
        stage = v * pstate.pp_size + pstate.pp_rank
        for i, (name, p) in enumerate(chunk.named_parameters()):
            order[id(p)] = ((stage, i), global_name(chunk, name))
    return order


def loss_step(chunk, microbatch):
    """The ``step_fn`` of the schedules: run a chunk; on the last stage sum the masked losses."""
    output = chunk(microbatch["tokens"], position_ids=microbatch.get("position_ids"),
                   labels=microbatch["labels"] if chunk.post_process else None)
    mask = microbatch["loss_mask"]

    def loss_fn(per_token_loss):
        return (per_token_loss.float() * mask).sum(), mask.sum()
    return output, loss_fn


class Trainer:
    """Holds the model chunks, optimizer and schedule of one rank, and runs iterations."""

    def __init__(self, cfg: Config, pstate: ParallelState, vocab_size: int, device=torch.device("cpu"), log=print):
        self.cfg, self.pstate, self.device, self.log = cfg, pstate, device, log
        self.tracker = model_parallel_seed(cfg.training.seed, pstate.tp_rank, pstate.pp_rank, device)
        t, p = cfg.training, cfg.parallel
        self.dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
        # Built in fp32 (so every dtype starts from the same weights), then cast.
        self.model = [chunk.to(device=device, dtype=self.dtype) for chunk in build_model(cfg, pstate, vocab_size, self.tracker)]
        self.buffer = GradBuffer(self.model, pstate.dp_cp_group, pstate.dp_cp_size, p.ddp_bucket_size,
                                 overlap=p.overlap_grad_reduce, reduce_scatter=p.use_distributed_optimizer,
                                 deferred_params=tied_embedding_params(self.model, pstate))
        self.optimizer = build_optimizer(self.model, self.buffer, pstate, cfg)
        self.scheduler = LRScheduler(t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters, t.lr_decay_style,
                                     t.lr_wsd_decay_iters, t.lr_wsd_decay_style)
        self.timeline = (Timeline(pstate.rank, pp_size=pstate.pp_size, pp_rank=pstate.pp_rank, vpp_size=len(self.model),
                                  microbatches=cfg.num_microbatches, tp_rank=pstate.tp_rank, dp_rank=pstate.dp_rank)
                         if cfg.logging.timeline_file else None)
        seq = cfg.model.seq_length // pstate.cp_size
        if cfg.parallel.sequence_parallel:
            seq //= pstate.tp_size
        self.p2p = P2P(pstate, (seq, t.micro_batch_size, cfg.model.hidden_size), self.dtype, device, self.timeline)
        self.schedule = get_schedule(pstate.pp_size, len(self.model), cfg.parallel.pipeline_schedule)
        self.padded_vocab_size = self.model[0].padded_vocab_size
        self.iteration = self.consumed_samples = 0
        self.skipped_iterations = self.nan_iterations = self.consumed_valid_samples = 0
        self.nan_streak = NonFiniteStreak(model_order(self.model, pstate), t.max_consecutive_nan_iterations,
                                          pstate.rank)

    def _run_schedule(self, microbatches: list[dict], forward_only: bool, loss_scale: float = 1.0) -> tuple[float, float]:
        """Run the schedule; return (sum of token losses, number of tokens) over the global batch."""
        tokens = torch.stack([mb["loss_mask"].sum() for mb in microbatches]).sum().reshape(1).double()
        if self.pstate.dp_cp_group is not None and self.pstate.dp_cp_size > 1:
            dist.all_reduce(tokens, group=self.pstate.dp_cp_group)
        # A tensor: no host sync before the forward on CUDA. With no loss token at all (a fully
        # masked global batch) dividing by 1 keeps the grads 0 instead of 0 * inf = NaN.
        grad_scale = (loss_scale / tokens[0].clamp(min=1.0)).float()
        for chunk in self.model:
            if chunk.training == forward_only:  # switch modes only when needed (a walk over all modules)
                chunk.train(not forward_only)
        losses = self.schedule(loss_step, self.model, microbatches, grad_scale=grad_scale,
                               p2p=self.p2p, forward_only=forward_only, timeline=self.timeline)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for loss, _ in losses:
            loss_sum += loss.double()
        if self.pstate.dp_cp_group is not None and self.pstate.dp_cp_size > 1:
            dist.all_reduce(loss_sum, group=self.pstate.dp_cp_group)
        return loss_sum.item(), tokens.item()

    def train_step(self, microbatches: list[dict]) -> dict:
        """One iteration over a global batch; returns loss, grad norm, lr and loss scale.

        Raises :class:`NonFiniteGradientsError` (on every rank) when this is the
        ``--max-consecutive-nan-iterations``-th iteration in a row with non-finite grads."""
        lr = self.scheduler.apply(self.optimizer)
        scaler = self.optimizer.scaler
        loss_scale = scaler.scale
        self.buffer.start_grad_sync(len(microbatches))
        start = time.perf_counter()
        loss_sum, tokens = self._run_schedule(microbatches, forward_only=False, loss_scale=loss_scale)
        if self.timeline is not None:  # the span tools/plot_timeline.py cuts the last iteration by
            self.timeline.record("iteration", start, time.perf_counter())
        finalize_model_grads(self.model, self.pstate, self.buffer)
        self.iteration += 1
        nonfinite = False
        if tokens > 0:
            updated, grad_norm = self.optimizer.step()
            loss = loss_sum / tokens
            if not updated:  # the grad norm was inf/NaN: a true non-finite step or an fp16 overflow?
                overflow_only = scaler.dynamic and loss_scale > scaler.min_scale and not any_rank(
                    not math.isfinite(loss_sum), self.device)
                nonfinite = not overflow_only
        else:  # every rank counts the same tokens (all-reduced over DP/CP, same samples on TP/PP)
            updated, grad_norm, loss = False, float("nan"), float("nan")
            if self.pstate.rank == 0:
                self.log(f"> iteration {self.iteration}: the global batch has no token with "
                         "loss_mask > 0; update skipped")
        if updated:
            self.scheduler.advance()  # as Megatron: a skipped update does not advance the LR schedule
        self.nan_iterations += nonfinite
        self.nan_streak.record(self.iteration, nonfinite, self.optimizer, self.log)  # may raise
        self.consumed_samples += self.cfg.training.global_batch_size
        self.skipped_iterations += not updated
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": loss_scale, "updated": updated,
                "tokens": tokens, "nonfinite": nonfinite}

    @torch.no_grad()
    def evaluate(self, batches: BatchIterator, eval_iters: int) -> float:
        """Mean token loss over ``eval_iters`` global batches of validation data."""
        loss_sum = tokens = 0.0
        for _ in range(eval_iters):
            s, n = self._run_schedule(batches.next_microbatches(self.cfg.num_microbatches), forward_only=True)
            self.consumed_valid_samples += self.cfg.training.global_batch_size
            loss_sum, tokens = loss_sum + s, tokens + n
        return loss_sum / max(tokens, 1.0)

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints: last pipeline stage, TP rank 0, DP rank 0, CP rank 0."""
        ps = self.pstate
        return ps.is_pipeline_last_stage() and ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0

    def flops_per_iteration(self, include_recompute: bool = True) -> float:
        """FLOPs of one iteration (megalite/flops.py); without recompute: the model FLOPs of MFU."""
        layers_per_chunk = self.cfg.model.num_layers // (self.pstate.pp_size * len(self.model))
        return model_flops_per_iteration(self.cfg.model, self.cfg.training.global_batch_size,
                                         self.padded_vocab_size, include_recompute, layers_per_chunk)


class StopConditions:
    """When to save and stop: ``--save-interval``, ``--exit-interval``, SIGTERM with
    ``--exit-signal-handler`` (agreed by all ranks), and the test-only fault injection."""

    def __init__(self, cfg: Config, pstate: ParallelState, device=torch.device("cpu")):
        self.cfg, self.pstate, self.reason, self.device = cfg, pstate, "", device
        self.signalled = self.signalled_now = False
        if cfg.logging.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def should_exit(self, iteration: int) -> bool:
        lg = self.cfg.logging
        if lg.exit_interval and iteration % lg.exit_interval == 0:
            self.reason = f"--exit-interval {lg.exit_interval}"
            return True
        if lg.exit_signal_handler and self.signalled_now:
            self.reason = "SIGTERM"
            return True
        return False

    def should_save(self, iteration: int) -> bool:
        lg = self.cfg.logging
        self.signalled_now = lg.exit_signal_handler and any_rank(self.signalled, self.device)
        return bool((lg.save_interval and iteration % lg.save_interval == 0) or self.signalled_now
                    or (lg.exit_interval and iteration % lg.exit_interval == 0))

    def inject_fault(self, iteration: int) -> None:
        lg = self.cfg.logging
        if lg.inject_fault_at_iteration == iteration and self.pstate.rank == lg.inject_fault_rank:
            print(f"> injected fault: rank {self.pstate.rank} exits after iteration {iteration}", flush=True)
            os._exit(17)


def pretrain(cfg: Config, pstate: ParallelState, datasets, vocab_size: int, device=torch.device("cpu"),
             log=print) -> list[dict]:
    """Train for ``--train-iters`` iterations; return per-iteration stats (``loss``, ``grad_norm``,
    ``lr``). The loss is known on the logging rank (last stage); elsewhere it is NaN."""
    check_same_flags_on_all_ranks(cfg)
    return train(Trainer(cfg, pstate, vocab_size, device, log), datasets)


def train(trainer: Trainer, datasets) -> list[dict]:
    """The loop of :func:`pretrain` for a built ``trainer``: load, iterate, log, evaluate, save.

    Raises :class:`NonFiniteGradientsError` after ``--max-consecutive-nan-iterations``
    iterations in a row with non-finite grads; no checkpoint is written during such a streak."""
    cfg, pstate, device, log = trainer.cfg, trainer.pstate, trainer.device, trainer.log
    train_ds, valid_ds, _ = datasets
    if pstate.rank == 0:
        report = trainer.optimizer.memory_report()
        log("> memory per parameter on rank 0 (bytes): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["per_param"].items()) +
            f" | total {sum(report['per_param'].values()):.2f}"
            + (f" (distributed optimizer over {pstate.dp_cp_size} ranks)" if trainer.optimizer.distributed else ""))
    if cfg.logging.load:
        load_checkpoint(trainer, cfg.logging.load, finetune=cfg.logging.finetune,
                        load_optim=not cfg.logging.no_load_optim, load_rng=not cfg.logging.no_load_rng, log=log)
    train_batches = BatchIterator(train_ds, cfg, pstate, trainer.consumed_samples, device)
    valid_batches = None
    if valid_ds is not None and len(valid_ds) > 0:  # (a weighted blend without validation samples is empty)
        valid_batches = BatchIterator(valid_ds, cfg, pstate, trainer.consumed_valid_samples % len(valid_ds), device)
    stop = StopConditions(cfg, pstate, device)
    monitor = TrainingMonitor(cfg, enabled=trainer.is_logging_rank, world_size=pstate.world_size,
                              flops_per_iteration=trainer.flops_per_iteration(),
                              model_flops_per_iteration=trainer.flops_per_iteration(include_recompute=False),
                              device=device, log=log)
    lg, t = cfg.logging, cfg.training
    history: list[dict] = []
    window_losses, window_time, window_iters = [], 0.0, 0
    for _ in range(trainer.iteration, t.train_iters):
        start = time.perf_counter()
        stats = trainer.train_step(train_batches.next_microbatches(cfg.num_microbatches))
        seconds = time.perf_counter() - start
        window_time, window_iters = window_time + seconds, window_iters + 1
        history.append({**stats, "loss": stats["loss"] if trainer.is_logging_rank else math.nan})
        if stats["updated"]:  # as Megatron: skipped iterations (no loss token, inf/NaN) are not averaged
            window_losses.append(stats["loss"])
        it = trainer.iteration
        monitor.iteration(it, stats, seconds)  # TensorBoard / W&B scalars (logging rank only)
        if it % lg.log_interval == 0 or it == t.train_iters:
            elapsed = window_time / window_iters
            if trainer.is_logging_rank:
                tflops = trainer.flops_per_iteration() / (elapsed * 1e12 * pstate.world_size)
                log(format_iteration_line(it, t.train_iters, trainer.consumed_samples, elapsed * 1000.0, tflops,
                                          stats["lr"], t.global_batch_size,
                                          sum(window_losses) / len(window_losses) if window_losses else math.nan,
                                          stats["loss_scale"], stats["grad_norm"], trainer.skipped_iterations,
                                          trainer.nan_iterations))
                log(monitor.progress_line(it, elapsed))  # tokens/s, MFU, ETA: a line of its own
            window_losses, window_time, window_iters = [], 0.0, 0
        if valid_batches is not None and lg.eval_interval and it % lg.eval_interval == 0 and lg.eval_iters > 0:
            val = trainer.evaluate(valid_batches, lg.eval_iters)
            if trainer.is_logging_rank:
                log(format_validation_line(f"iteration {it}", val))
                monitor.validation(it, val)
        if stop.should_save(it) and cfg.logging.save:
            _save_unless_nonfinite(trainer, it)
        stop.inject_fault(it)
        if stop.should_exit(it):
            log(f"> exiting after iteration {it} ({stop.reason})") if pstate.rank == 0 else None
            break
    if cfg.logging.save and trainer.iteration > 0 and read_tracker(cfg.logging.save) != trainer.iteration:
        _save_unless_nonfinite(trainer, trainer.iteration)
    if trainer.timeline is not None:
        trainer.timeline.save(cfg.logging.timeline_file)
    monitor.close()
    return history


def _save_unless_nonfinite(trainer: Trainer, iteration: int) -> None:
    """Save a checkpoint, except during a streak of non-finite iterations (said in the log)."""
    if not trainer.nan_streak.active:
        save_checkpoint(trainer, trainer.cfg.logging.save, trainer.cfg.logging.keep_last, log=trainer.log)
    elif trainer.pstate.rank == 0:
        trainer.log(f"> iteration {iteration}: no checkpoint saved: the gradients have been non-finite since "
                    f"iteration {trainer.nan_streak.first_iteration}")
