"""Memory, communication, FLOPs and step-time estimates for a model and a parallel layout.

The numbers behind ``tools/plan.py`` (which formats them) and the log line's FLOPs. Everything
is per rank, from a validated :class:`~megalite.config.Config` (``world_size`` set) and the
real vocabulary size:

* ``flops``: :func:`model_flops_per_iteration` (Megatron's formula; the log line's TFLOP/s, MFU).
* ``params``: :func:`stage_params`, exact parameter counts of one pipeline rank (per TP shard;
  MoE: its EP share of the experts), :func:`total_params` / :func:`active_params` (MoE: the
  top-k experts a token runs), and :func:`state_bytes`, weights, grads, fp32 main params and Adam state.
* ``activations``: :func:`layer_activation_bytes` / :func:`stage_activations`, activation
  memory term by term; :func:`korthikanti_layer_bytes`, the paper's formula, for reference.
* ``layout``: a rank's micro-batch shape, model chunks, in-flight micro-batches, the bubble.
* ``comm``: :func:`communication`, bytes per step per group (TP, DP, PP, embedding).
* ``planner``: :func:`plan` puts it together with a simple step-time model; :func:`search`
  ranks the layouts of a world size that fit in device memory.

Imports only the lower floors: ``megalite.config``, ``megalite.model``, ``megalite.tensor_parallel``.
"""
from .activations import (activation_dtype_bytes, korthikanti_layer_bytes, layer_activation_bytes,
                          stage_activations, stage_extra_activation_bytes)
from .comm import communication
from .flops import model_flops_per_iteration, num_floating_point_operations
from .hardware import GiB, Hardware
from .layout import in_flight_microbatches, local_dims, model_chunks, pipeline_bubble
from .params import (active_params, bytes_per_param, layer_params, padded_vocab, stage_expert_params,
                     stage_params, state_bytes, total_params)
from .planner import Plan, plan, search

__all__ = ["GiB", "Hardware", "Plan", "active_params", "activation_dtype_bytes", "bytes_per_param", "communication",
           "in_flight_microbatches", "korthikanti_layer_bytes", "layer_activation_bytes", "layer_params",
           "local_dims", "model_chunks", "model_flops_per_iteration", "num_floating_point_operations",
           "padded_vocab", "pipeline_bubble", "plan", "search", "stage_activations",
           "stage_expert_params", "stage_extra_activation_bytes", "stage_params", "state_bytes", "total_params"]
