"""What the trainer does for MoE models each iteration, besides the LM loss.

Before the schedule it sets the weight of the routers' auxiliary losses (loss scale / number
of micro-batches in the global batch, so the objective is the LM loss plus the mean of the
micro-batches' auxiliary losses at every layout). After it, it sums what the routers recorded
in their backward (:class:`~megalite.model.moe.MoERecorder`): per MoE layer the load-balancing
loss, the z-loss and the tokens each expert received, over the micro-batches of this rank,
the data-parallel ranks and the pipeline stages. The routers' statistics are already summed
over the TP (sequence-parallel) and CP ranks that share a micro-batch, so those are not
summed again. With ``--moe-router-enable-expert-bias`` it then moves each router's expert bias
(DeepSeek-V3's aux-loss-free balancing) by the global batch's expert load.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.moe import MoELayer


class MoEStats:
    """The MoE layers of one rank's model chunks and their per-iteration statistics."""

    def __init__(self, model_chunks, pstate, cfg):
        self.pstate, self.cfg = pstate, cfg
        self.recorders = [chunk.ctx.moe for chunk in model_chunks if chunk.ctx.moe is not None]
        self.routers = {layer.mlp.router.layer_number: layer.mlp.router for chunk in model_chunks
                        for layer in chunk.layers if isinstance(layer.mlp, MoELayer)}
        self.device = next(model_chunks[0].parameters()).device

    def start(self, aux_scale: float) -> None:
        """Set the auxiliary losses' gradient weight for this iteration; forget the last one."""
        for recorder in self.recorders:
            recorder.aux_scale = aux_scale
            recorder.records.clear()

    def finish(self) -> dict:
        """The iteration's MoE figures (the same on every rank): ``moe_aux_loss`` and
        ``moe_z_loss`` (means over MoE layers and micro-batches), ``moe_load_imbalance`` (the
        largest max/mean tokens-per-expert ratio of any layer) and ``moe_tokens_per_expert``
        (global layer -> list of tokens per expert in the global batch)."""
        E, layers = self.cfg.model.num_experts, self.cfg.model.num_layers
        stats = torch.zeros(layers, E + 3, dtype=torch.float64, device=self.device)
        for recorder in self.recorders:
            for r in recorder.records:
                stats[r["layer"], :E] += r["tokens_per_expert"].double()
                stats[r["layer"], E:] += torch.stack([r["aux"].double(), r["z"].double(), stats.new_ones(())])
        for group in (self.pstate.dp_group, self.pstate.pp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(stats, group=group)
        stats = stats.cpu()
        moe_layers = (stats[:, E + 2] > 0).nonzero(as_tuple=True)[0].tolist()
        if not moe_layers:  # (no backward ran: nothing recorded)
            return {}
        counts = stats[moe_layers, E + 2]
        tokens = stats[moe_layers, :E]
        imbalance = (tokens.max(dim=1).values / tokens.mean(dim=1).clamp(min=1e-9)).max().item()
        return {"moe_aux_loss": (stats[moe_layers, E] / counts).mean().item(),
                "moe_z_loss": (stats[moe_layers, E + 1] / counts).mean().item(),
                "moe_load_imbalance": imbalance,
                "moe_tokens_per_expert": {layer: stats[layer, :E].tolist() for layer in moe_layers}}

    def update_expert_bias(self, figures: dict) -> None:
        """After a successful update: each router's bias moves by the global batch's load."""
        if not self.cfg.model.moe_router_enable_expert_bias or not figures:
            return
        for layer, router in self.routers.items():
            load = torch.tensor(figures["moe_tokens_per_expert"][layer], dtype=torch.float32)
            router.update_expert_bias(load.to(router.expert_bias.device), self.cfg.model.moe_router_bias_update_rate)

    def state_dict(self) -> dict:
        """This rank's routers' expert biases by global layer (empty without expert bias)."""
        return {layer: router.expert_bias.tolist() for layer, router in self.routers.items()
                if router.expert_bias is not None}

    def load_state_dict(self, biases: dict) -> None:
        for layer, router in self.routers.items():
            if router.expert_bias is not None and str(layer) in biases:
                router.expert_bias.copy_(torch.tensor(biases[str(layer)], dtype=router.expert_bias.dtype))
