"""The optimizer of megalite: fp32 main weights, loss scaling, optional ZeRO-1 sharding.

The optimizer updates *fragments*: contiguous ranges of the flat parameter buffer, each
inside one parameter. Each fragment has an fp32 main tensor (a view of the parameter itself
when the model is fp32, else an fp32 copy) whose ``.grad`` is a view of the fp32 grad buffer.

* Without ``--use-distributed-optimizer`` a fragment is a whole parameter, on every rank.
* With it, each data-parallel rank owns an equal shard of every bucket (see
  :meth:`GradBuffer.shard_range`); its fragments are the pieces of parameters inside those
  shards. The grads arrive reduce-scattered, the rank updates only its fragments (so its Adam
  state and fp32 main weights are 1/DP of the model), then the params are all-gathered.

Adam is elementwise, so updating fragments gives exactly the update of whole parameters.

MoE models have a second buffer for the expert params (reduced and, with the distributed
optimizer, sharded over the expert-data-parallel group); fragments know their buffer, and the
grad norm sums each buffer's part over the groups in which its elements are distinct.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.grad_buffer import GradBuffer
from ..model import named_global_parameters
from ..parallel_state import ParallelState
from .clip_grads import norm_counted
from .loss_scaler import LossScaler


@dataclass
class Fragment:
    """Elements ``[start, end)`` of the flat buffers; all inside ``param`` (global name ``name``),
    at ``offset`` from the param's first element."""
    param: torch.nn.Parameter
    start: int
    end: int
    main: torch.Tensor
    name: str = ""
    offset: int = 0
    buffer: GradBuffer | None = None


def parameter_fragments(buffer: GradBuffer, dp_rank: int | None) -> list[tuple[torch.nn.Parameter, int, int]]:
    """``(param, start, end)`` buffer ranges this rank updates: whole params when ``dp_rank`` is
    None, else the pieces of params inside ``dp_rank``'s shard of every bucket."""
    pieces = []
    for bucket in buffer.buckets:
        lo, hi = (bucket.start, bucket.end) if dp_rank is None else buffer.shard_range(bucket, dp_rank)
        for p in bucket.params:
            p_start, p_end = buffer.param_range[id(p)]
            start, end = max(lo, p_start), min(hi, p_end)
            if start < end:
                pieces.append((p, start, end))
    return pieces


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update ``params``: one pass over each tensor instead
    of a handful of elementwise ops (about 3x faster on CPU, and the fastest option on CUDA).
    It updates element by element as the loop implementation does (same results to rounding)."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def uses_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's rule: no weight decay on biases and on 1-D params (norm weights)."""
    return not (param.ndim == 1 or name.endswith(".bias"))


class MixedPrecisionOptimizer:
    """AdamW over fp32 main fragments, with grad unscaling, inf check, global-norm clipping."""

    def __init__(self, model_chunks, buffers: list[GradBuffer], pstate: ParallelState, *, lr: float,
                 weight_decay: float, betas: tuple[float, float], eps: float, clip_grad: float,
                 scaler: LossScaler, distributed: bool = False):
        self.buffers, self.buffer = buffers, buffers[0]  # (the dense params' buffer first)
        self.pstate, self.clip_grad, self.scaler = pstate, clip_grad, scaler
        self.distributed = distributed and pstate.dp_cp_size > 1
        # With the distributed optimizer, each buffer whose data-parallel group has > 1 rank is
        # sharded over it (the expert buffer over EDP, which may be 1 where DP x CP is not).
        self.sharded_buffers = [b for b in buffers if distributed and b.dp_size > 1]
        decays = {id(p): uses_weight_decay(n, p) for chunk in model_chunks for n, p in chunk.named_parameters()}
        names = {id(p): name for name, p in named_global_parameters(model_chunks)}
        fp32_model = self.buffer.param_data.dtype == torch.float32
        self.fragments = []
        for buffer in self.buffers:
            sharded = buffer in self.sharded_buffers
            for p, start, end in parameter_fragments(buffer, buffer.dp_rank if sharded else None):
                main = buffer.param_data[start:end]
                main = main if fp32_model else main.float()  # fp32 model: update the params in place
                main.grad = buffer.grad_data[start:end]
                offset = start - buffer.param_range[id(p)][0]
                self.fragments.append(Fragment(p, start, end, main, names[id(p)], offset, buffer))
        groups = [{"params": [f.main for f in self.fragments if decays[id(f.param)]], "weight_decay": weight_decay},
                  {"params": [f.main for f in self.fragments if not decays[id(f.param)]], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                                           fused=fused_adamw_supported([f.main for f in self.fragments]))
        self.copy_back = not fp32_model
        self._counted = torch.tensor([norm_counted(f.param, pstate.tp_rank) for f in self.fragments],
                                     dtype=torch.bool, device=self.buffer.grad_data.device)
        self._is_expert = torch.tensor([getattr(f.param, "expert", False) for f in self.fragments],
                                       dtype=torch.bool, device=self.buffer.grad_data.device)
        # MoE: expert grads are distinct over the expert grid's tp_ep_pp group (+ edp when sharded).
        self._norm_groups = [[pstate.mp_group] + ([pstate.dp_cp_group] if self.distributed else [])]
        if "tp_ep_pp" in pstate.groups:  # every rank joins, also a stage without expert params
            self._norm_groups.append([pstate.tp_ep_pp_group] + ([pstate.edp_group] if distributed else []))
        self.num_updates = 0  # successful steps: Adam's step count (saved in checkpoints)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _grads(self) -> list[torch.Tensor]:
        return [f.main.grad for f in self.fragments]

    def grad_norm(self) -> float:
        """Global L2 norm of the (unscaled) grads, every element of the model counted once; NaN
        when any grad on any rank is not finite, also one the norm does not count (a replica on
        another TP rank, the last stage's copy of a tied embedding): a replica with a NaN would
        otherwise be updated with it and drift from its twins."""
        # Per part (dense, experts): [sum of squares, non-finite count], each summed over its groups.
        stats = torch.zeros(len(self._norm_groups), 2, dtype=torch.float32, device=self.buffer.grad_data.device)
        grads = self._grads()
        if grads:  # one foreach kernel for all the per-tensor norms (no mask indexing: no host sync)
            norms = torch.stack(torch._foreach_norm(grads))
            for part in range(len(self._norm_groups)):
                mine = self._is_expert if part else ~self._is_expert
                stats[part, 0] = torch.where(self._counted & mine, norms, 0.0).square().sum()
                stats[part, 1] = (~torch.isfinite(norms) & mine).sum().float()
        for part, groups in enumerate(self._norm_groups):
            for group in groups:
                if group is not None and dist.get_world_size(group) > 1:
                    dist.all_reduce(stats[part], group=group)
        sum_of_squares, nonfinite = stats.sum(0).tolist()  # one host sync
        return math.sqrt(sum_of_squares) if nonfinite == 0 else float("nan")

    def step(self) -> tuple[bool, float]:
        """Unscale, take the global grad norm, skip the update if it is not finite, else clip,
        update and publish the params.

        Any inf/NaN grad on any rank makes the norm NaN (see :meth:`grad_norm`), and the norm is
        all-reduced over every rank that holds different grads, so all ranks skip together, in
        every precision (the dynamic fp16 scaler then backs off). Returns ``(updated, grad_norm)``."""
        grads = self._grads()
        if self.scaler.scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        norm = self.grad_norm()
        finite = math.isfinite(norm)
        self.scaler.update(found_inf=not finite)
        if not finite:
            return False, norm
        if self.clip_grad > 0 and norm > self.clip_grad and grads:
            torch._foreach_mul_(grads, self.clip_grad / (norm + 1e-6))
        self.optimizer.step()
        self.num_updates += 1
        if self.copy_back and self.fragments:  # fp32 main -> bf16/fp16 params, one foreach call
            torch._foreach_copy_([f.buffer.param_data[f.start:f.end] for f in self.fragments],
                                 [f.main for f in self.fragments])
        for buffer in self.sharded_buffers:
            buffer.all_gather_params()
        return True, norm

    def nonfinite_params(self) -> list[torch.nn.Parameter]:
        """The params whose grads (the reduced part this rank updates) hold an inf or NaN."""
        return [f.param for f in self.fragments if not torch.isfinite(f.main.grad).all()]

    # -- accounting and state ------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes this rank holds for params, grads, fp32 main params and Adam state, and per
        parameter of this rank's model (Megatron: 18 B/param for bf16, 6 + 12/DP distributed)."""
        model_numel = sum(p.numel() for b in self.buffers for p in b.params)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        if not self.optimizer.state:  # before the first step: what Adam will allocate
            state = sum(2 * f.main.numel() * 4 for f in self.fragments)
        report = {"params": model_numel * self.buffer.param_data.element_size(),
                  "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in self.buffers),
                  "main_params": sum(f.main.numel() * 4 for f in self.fragments) if self.copy_back else 0,
                  "optimizer_state": state}
        report["per_param"] = {k: v / model_numel for k, v in list(report.items())}
        return report

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def state_dict(self) -> dict:
        """This rank's optimizer state by global parameter name: for each fragment it updates,
        ``{"start", "end"}`` (element range within the param's local tensor, flattened) and its
        fp32 ``main`` params and Adam moments; plus Adam's step count and the loss scaler.
        The tensors are views of the live state: copy what must outlive the next step."""
        fragments = {}
        for f in self.fragments:
            adam = self.optimizer.state.get(f.main, {})
            fragments[f.name] = {"start": f.offset, "end": f.offset + f.main.numel(), "main": f.main.detach(),
                                 **{k: adam[k].detach() for k in self.MOMENTS if k in adam}}
        return {"step": self.num_updates, "scaler": self.scaler.state_dict(), "fragments": fragments}

    def fragment_ranges(self) -> dict[str, tuple[int, int]]:
        """``global name -> (start, end)`` of the piece of each param this rank updates."""
        return {f.name: (f.offset, f.offset + f.main.numel()) for f in self.fragments}

    def checkpoint_ranges(self) -> dict[str, tuple[int, int]]:
        """``global name -> (start, end)`` of the piece of each param this rank writes to a
        checkpoint: its fragments with the distributed optimizer; otherwise the same 1/DP
        partition of the grad buffer (every DP rank holds all of the state, so they share the
        writing)."""
        names = {id(f.param): f.name for f in self.fragments}
        ranges = {}
        for buffer in self.buffers:
            if buffer in self.sharded_buffers or buffer.dp_size == 1:
                ranges.update({f.name: (f.offset, f.offset + f.main.numel())
                               for f in self.fragments if f.buffer is buffer})
                continue
            for p, start, end in parameter_fragments(buffer, buffer.dp_rank):
                offset = buffer.param_range[id(p)][0]
                ranges[names[id(p)]] = (start - offset, end - offset)
        return ranges

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s layout; ``state["fragments"]`` must hold exactly this
        rank's :meth:`fragment_ranges` (a checkpoint of another layout is cut to them first)."""
        self.num_updates = state["step"]
        self.scaler.load_state_dict(state["scaler"])
        for f in self.fragments:
            piece = state["fragments"][f.name]
            if (piece["start"], piece["end"]) != (f.offset, f.offset + f.main.numel()):
                raise ValueError(f"optimizer state of {f.name}: elements [{piece['start']}, {piece['end']}) "
                                 f"given, this rank updates [{f.offset}, {f.offset + f.main.numel()})")
            with torch.no_grad():
                f.main.copy_(piece["main"].reshape(-1))
            self.optimizer.state[f.main] = {  # fused AdamW keeps "step" on the params' device
                "step": torch.tensor(float(self.num_updates), device=f.main.device),
                **{k: piece[k].reshape(-1).clone().to(f.main.device) for k in self.MOMENTS}}

    def reload_main_params(self) -> None:
        """Copy the model's params into the fp32 main params (after the params were loaded
        without optimizer state); Adam starts afresh."""
        self.optimizer.state.clear()
        with torch.no_grad():
            for f in self.fragments:
                f.main.copy_(f.buffer.param_data[f.start:f.end])
