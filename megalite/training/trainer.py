"""One rank's training step: micro-batches -> pipeline schedule -> grad sync -> clip -> optimizer step.

:class:`Trainer` holds the model chunks, grad buffer, optimizer, LR schedule and pipeline
schedule of one rank. One iteration (:meth:`Trainer.train_step`)::

    micro-batches of this DP rank -> schedule (forward/backward, p2p between stages)
    -> finalize_model_grads (DP, tied embedding, SP norms) -> grad norm -> clip -> step
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ..config import Config
from ..distributed.finalize import finalize_model_grads, tied_embedding_params
from ..distributed.grad_buffer import GradBuffer
from ..model import build_model, global_name
from ..optimizer import build_optimizer
from ..optimizer.lr_scheduler import LRScheduler
from ..optimizer.nonfinite import NonFiniteStreak, any_rank
from ..parallel_state import ParallelState
from ..pipeline_parallel.p2p import P2P
from ..pipeline_parallel.schedules import get_schedule
from ..pipeline_parallel.timeline import Timeline
from ..planning.flops import model_flops_per_iteration
from ..tensor_parallel import model_parallel_seed
from .batches import BatchIterator
from .moe_stats import MoEStats


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
                   labels=microbatch["labels"] if chunk.post_process else None,
                   document_ids=microbatch.get("document_ids"))
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
        self.buffers = self._grad_buffers()
        self.buffer = self.buffers[0]  # the dense params' (expert params, if any, in a second one)
        self.optimizer = build_optimizer(self.model, self.buffers, pstate, cfg)
        self.moe = MoEStats(self.model, pstate, cfg) if cfg.model.num_experts else None
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

    def _grad_buffers(self) -> list[GradBuffer]:
        """The dense params' buffer (reduced over DP x CP) and, with MoE, the expert params' one
        (reduced over the expert-data-parallel group; a stage without MoE layers has none)."""
        p, ps = self.cfg.parallel, self.pstate
        params = [q for chunk in self.model for q in chunk.parameters()]
        common = dict(bucket_size=p.ddp_bucket_size, overlap=p.overlap_grad_reduce,
                      reduce_scatter=p.use_distributed_optimizer)
        buffers = [GradBuffer([q for q in params if not getattr(q, "expert", False)], ps.dp_cp_group,
                              ps.dp_cp_size, **common, deferred_params=tied_embedding_params(self.model, ps))]
        experts = [q for q in params if getattr(q, "expert", False)]
        if experts:
            buffers.append(GradBuffer(experts, ps.edp_group, ps.edp_size, **common))
        return buffers

    COUNTERS = ("iteration", "consumed_samples", "consumed_valid_samples", "skipped_iterations", "nan_iterations")

    def state_dict(self) -> dict:
        """The trainer's own progress counters (iteration, samples consumed, skipped / nan iterations)."""
        return {name: getattr(self, name) for name in self.COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.COUNTERS:  # (older checkpoints lack the later counters: they start at 0)
            setattr(self, name, state.get(name, 0))

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
        for buffer in self.buffers:
            buffer.start_grad_sync(len(microbatches))
        if self.moe is not None:  # the aux losses' weight: loss scale / micro-batches of the global batch
            self.moe.start(loss_scale / (len(microbatches) * self.pstate.dp_size))
        start = time.perf_counter()
        loss_sum, tokens = self._run_schedule(microbatches, forward_only=False, loss_scale=loss_scale)
        if self.timeline is not None:  # the span tools/plot_timeline.py cuts the last iteration by
            self.timeline.record("iteration", start, time.perf_counter())
        finalize_model_grads(self.model, self.pstate, self.buffers)
        moe = self.moe.finish() if self.moe is not None else {}
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
            if self.moe is not None:
                self.moe.update_expert_bias(moe)
        self.nan_iterations += nonfinite
        self.nan_streak.record(self.iteration, nonfinite, self.optimizer, self.log)  # may raise
        self.consumed_samples += self.cfg.training.global_batch_size
        self.skipped_iterations += not updated
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": loss_scale, "updated": updated,
                "tokens": tokens, "nonfinite": nonfinite, **moe}

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
        """FLOPs of one iteration (megalite/planning/flops.py); without recompute: the model FLOPs of MFU."""
        layers_per_chunk = self.cfg.model.num_layers // (self.pstate.pp_size * len(self.model))
        return model_flops_per_iteration(self.cfg.model, self.cfg.training.global_batch_size,
                                         self.padded_vocab_size, include_recompute, layers_per_chunk)
