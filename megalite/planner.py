"""Memory, communication and step-time estimates for a model and a parallel layout.

The numbers behind ``tools/plan.py`` (which formats them). Everything is per rank, from a
validated :class:`~megalite.config.Config` (``world_size`` set) and the real vocabulary size:

* :func:`stage_params`: exact parameter counts of one pipeline rank (per TP shard): padded
  vocabulary, the embedding on the first stage and its tied copy on the last, biases, norms.
* :func:`state_bytes`: weights, grads, fp32 main params and Adam state (Megatron's table:
  18 B/param for bf16, 6 + 12/DP with the distributed optimizer; 16 and 8 + 8/DP for fp32).
* :func:`layer_activation_bytes` / :func:`stage_activations`: activation memory, term by term
  after Korthikanti et al. (2022) but for megalite's kernels (see docs/performance.md, "Planner"),
  and :func:`korthikanti_layer_bytes`, the paper's ``sbh(34 + 5as/h)`` family, for reference.
* :func:`communication`: bytes per step per group (TP, DP, PP, embedding).
* :func:`plan` puts it together with the pipeline bubble and a simple step-time model;
  :func:`search` ranks the layouts of a world size that fit in device memory.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from .config import Config, validate
from .flops import model_flops_per_iteration
from .model import stage_layer_ranges
from .tensor_parallel.layers import pad_vocab_size

GiB = 2.0 ** 30


@dataclass
class Hardware:
    """What the estimates assume about the machine (the ``tools/plan.py`` flags)."""
    device_memory_gb: float = 80.0   # GiB per device
    peak_tflops: float = 989.0       # dense bf16 peak per device (H100 SXM)
    efficiency: float = 0.5          # achieved fraction of the peak in the model's matmuls
    intra_node_gbps: float = 200.0   # GB/s per device inside a node (NVLink, achieved bus bandwidth)
    inter_node_gbps: float = 25.0    # GB/s per device across nodes (InfiniBand / RoCE)
    gpus_per_node: int = 8
    device: str = "cuda"             # "cpu": dropout masks are stored in the activation dtype, and
    #                                   SDPA falls back to the math path when attention dropout > 0


# -- parameters -----------------------------------------------------------------------------
def padded_vocab(cfg: Config, vocab_size: int) -> int:
    return pad_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)


def _norm_params(m) -> int:
    return 2 * m.hidden_size if m.normalization == "LayerNorm" else m.hidden_size


def layer_params(m, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    bias = not m.disable_bias_linear
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    parts = 2 if m.swiglu else 1
    count = 2 * _norm_params(m)
    count += qkv * h // tp + (qkv // tp if bias else 0)                       # column-parallel QKV
    count += h * m.num_attention_heads * d // tp + (h if bias else 0)          # row-parallel proj (bias replicated)
    count += parts * m.ffn_hidden_size * h // tp + (parts * m.ffn_hidden_size // tp if bias else 0)
    count += h * m.ffn_hidden_size // tp + (h if bias else 0)
    return count


def stage_params(cfg: Config, vocab_size: int, pp_rank: int, padded_vocab_size: int | None = None) -> dict[str, int]:
    """Exact parameter counts of pipeline rank ``pp_rank`` (one TP shard), by part."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ranges = stage_layer_ranges(m.num_layers, pp, pp_rank, p.num_layers_per_virtual_pipeline_stage)
    vocab_rows = (padded_vocab_size or padded_vocab(cfg, vocab_size)) // tp * m.hidden_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not m.untie_embeddings_and_output_weights
    counts = {"embedding": vocab_rows if first else 0,
              "position_embedding": m.max_position_embeddings * m.hidden_size
              if first and m.position_embedding_type == "learned_absolute" else 0,
              "layers": sum(end - start for start, end in ranges) * layer_params(m, tp),
              "final_norm": _norm_params(m) if last else 0,
              # the output layer: its own weight when untied; the tied copy on a last stage that
              # is not also the first (with PP=1 the one embedding serves both)
              "output_layer": vocab_rows if last and (not tied or not first) else 0}
    counts["total"] = sum(counts.values())
    return counts


def total_params(cfg: Config, vocab_size: int) -> int:
    """Parameters of the whole model (vocabulary padded as for this TP size), a tied
    embedding counted once."""
    whole = copy.deepcopy(cfg)
    whole.parallel.tensor_model_parallel_size, whole.parallel.pipeline_model_parallel_size = 1, 1
    whole.parallel.num_layers_per_virtual_pipeline_stage = None
    return stage_params(whole, vocab_size, 0, padded_vocab(cfg, vocab_size))["total"]


# -- weights, grads, optimizer --------------------------------------------------------------
def state_bytes(num_params: int, cfg: Config) -> dict[str, float]:
    """Bytes of a rank holding ``num_params`` params: weights, grads, main params, Adam state.

    Grads are fp32 (the grad buffer); with bf16/fp16 the optimizer keeps fp32 main params.
    The distributed optimizer shards main params and Adam over the ``dp x cp`` ranks (each
    holds ``ceil(P / DP)`` elements of the padded buffer).
    """
    t, p = cfg.training, cfg.parallel
    half = t.bf16 or t.fp16
    dp = cfg.data_parallel_size * p.context_parallel_size
    shard = math.ceil(num_params / dp) if p.use_distributed_optimizer and dp > 1 else num_params
    out = {"weights": (2 if half else 4) * num_params, "grads": 4 * num_params,
           "main_params": 4 * shard if half else 0, "optimizer": 8 * shard}
    out["total"] = sum(out.values())
    out["per_param"] = out["total"] / max(num_params, 1)
    return out


def bytes_per_param(cfg: Config) -> float:
    """Megatron's table: 18 / 6 + 12/d (bf16, fp16), 16 / 8 + 8/d (fp32)."""
    t, p = cfg.training, cfg.parallel
    dp = cfg.data_parallel_size * p.context_parallel_size
    fixed, sharded = (6, 12) if t.bf16 or t.fp16 else (8, 8)
    return fixed + sharded / (dp if p.use_distributed_optimizer else 1)


# -- activations ----------------------------------------------------------------------------
def _dims(cfg: Config):
    m, p, t = cfg.model, cfg.parallel, cfg.training
    s = m.seq_length // p.context_parallel_size
    return s, t.micro_batch_size, m.hidden_size, p.tensor_model_parallel_size, p.sequence_parallel


def activation_dtype_bytes(cfg: Config) -> int:
    return 2 if cfg.training.bf16 or cfg.training.fp16 else 4


def layer_activation_bytes(cfg: Config, hw: Hardware, recompute: str | None = "config") -> float:
    """Bytes one transformer layer keeps for backward, per micro-batch and TP rank.

    ``recompute``: None, "selective" or "full" (default: the config's). Terms, with
    ``E = s b h`` elements and ``beta`` bytes per activation element (2 bf16/fp16, 4 fp32):
    norm inputs (RMSNorm also keeps its normalised output), the QKV and fc1 inputs (under SP
    the local sequence shard: the gathered input is re-gathered in backward), the QKV output
    (Q, K, V), RoPE'd Q and K, the attention context, the MLP's hidden activations (2 of width
    ffn for GELU, 4 for SwiGLU) and dropout masks; the core attention keeps only a log-sum-exp
    with fused SDPA, or the ``s x s`` scores (the paper's ``5as/h``) on the math path.
    """
    m = cfg.model
    recompute = m.recompute_granularity if recompute == "config" else recompute
    s, b, h, tp, sp = _dims(cfg)
    beta = activation_dtype_bytes(cfg)
    mask = beta if hw.device == "cpu" else 1
    E = s * b * h
    if recompute == "full":
        return beta * E / (tp if sp else 1)                     # the layer input only
    rep = 1.0 / tp if sp else 1.0                               # replicated region: sharded by SP
    heads, groups, d = m.num_attention_heads / tp, m.num_query_groups / tp, h // m.num_attention_heads
    total = 2 * _norm_bytes(m, s, b, h, beta) * rep
    if m.hidden_dropout > 0:
        total += 2 * mask * E * rep
    total += 2 * beta * E * rep                                 # QKV and fc1 inputs (SP: the local shard)
    total += beta * s * b * d * heads                           # context = proj input
    total += beta * E * m.ffn_hidden_size / h * (4 if m.swiglu else 2) / tp
    qkv_out = beta * s * b * d * (heads + 2 * groups)           # Q, K, V (views of the QKV output)
    rotated = beta * s * b * d * (heads + groups) if m.position_embedding_type == "rope" else 0
    if recompute != "selective" and hw.device == "cpu" and m.attention_dropout > 0:
        # SDPA's math path (computes in fp32): keeps scaled Q and K copies, V (a view keeping the
        # QKV output alive in fp32 without GQA, else a copy expanded to all heads) and the
        # s x s softmax, dropout mask and dropped probabilities.
        shared_v = beta == 4 and groups == heads
        total += (qkv_out if shared_v else 0) + 4 * s * b * d * heads * (2 if shared_v else 3)
        total += 3 * 4 * heads * s * s * b
    else:
        total += qkv_out + rotated
        if recompute != "selective":
            total += 4 * heads * s * b                          # fused SDPA: fp32 log-sum-exp
    return total


def _norm_bytes(m, s: int, b: int, h: int, beta: int) -> float:
    """LayerNorm keeps its input and mean / rstd; torch's RMSNorm keeps an fp32 copy of its
    input and its fp32 normalised output (8 bytes per element whatever the dtype) and rstd."""
    if m.normalization == "LayerNorm":
        return beta * s * b * h + 2 * beta * s * b
    return 8 * s * b * h + 4 * s * b


def korthikanti_layer_bytes(cfg: Config, recompute: str | None = "config") -> float:
    """The paper's per-layer bytes (16-bit activations, 1-byte masks, materialised scores):
    ``sbh(10 + 24/t + 5as/ht)``, ``sbh(34 + 5as/h)/t`` with SP; selective drops the ``5as/h``
    term; full keeps ``2sbh`` (``/t`` with SP)."""
    m = cfg.model
    recompute = m.recompute_granularity if recompute == "config" else recompute
    s, b, h, t, sp = _dims(cfg)
    a = m.num_attention_heads
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    scores = 0 if recompute == "selective" else 5 * a * s / (h * t)
    return s * b * h * ((34 / t if sp else 10 + 24 / t) + scores)


def stage_extra_activation_bytes(cfg: Config, hw: Hardware, vocab_size: int, first: bool, last: bool) -> float:
    """Per micro-batch: the embedding (ids, dropout mask) and the output layer and loss (final
    norm input, logits input, the fp32 softmax of the cross entropy, targets)."""
    m = cfg.model
    s, b, h, tp, sp = _dims(cfg)
    beta = activation_dtype_bytes(cfg)
    mask = beta if hw.device == "cpu" else 1
    rep = 1.0 / tp if sp else 1.0
    total = 0.0
    if first:  # token ids (and position ids) kept by the embedding lookups
        total += 8 * s * b + (8 * s if m.position_embedding_type == "learned_absolute" else 0)
        total += s * b if tp > 1 else 0                          # vocab-range mask of the lookup
        if m.hidden_dropout > 0:
            total += mask * s * b * h * rep
        elif sp:  # the first norm keeps a view of the whole (unscattered) embedding output alive
            total += beta * s * b * h * (1 - rep)
    if m.position_embedding_type == "rope":  # the cos / sin tables, shared by the layers
        total += 2 * beta * s * (h // m.num_attention_heads)
    if last:
        norm = _norm_bytes(m, s, b, h, beta) * rep
        total += norm + beta * s * b * h * rep + 4 * s * b * padded_vocab(cfg, vocab_size) / tp + 13 * s * b
    return total


def in_flight_microbatches(cfg: Config, pp_rank: int) -> int:
    """Forward passes (of one model chunk) whose activations a rank holds at its peak."""
    p = cfg.parallel
    pp, m = p.pipeline_model_parallel_size, cfg.num_microbatches
    if pp == 1:
        return 1
    if p.pipeline_schedule == "gpipe":
        return m
    chunks = _chunks(cfg)
    if chunks == 1:
        return min(pp - pp_rank, m)
    total = m * chunks
    if m == pp:
        return total
    return min((pp - pp_rank - 1) * 2 + (chunks - 1) * pp + 1, total)


def _chunks(cfg: Config) -> int:
    p = cfg.parallel
    vl = p.num_layers_per_virtual_pipeline_stage
    return cfg.model.num_layers // p.pipeline_model_parallel_size // vl if vl else 1


def _recompute_split(cfg: Config, layers: int) -> tuple[int, int, int]:
    """``(checkpoint inputs, fully stored layers, layers recomputed at once)`` for a chunk."""
    m = cfg.model
    if m.recompute_granularity != "full":
        return 0, layers, 0
    n = m.recompute_num_layers or 1
    if m.recompute_method == "uniform":
        return math.ceil(layers / n), 0, min(n, layers)
    recomputed = min(n, layers)
    return recomputed, layers - recomputed, 1 if recomputed else 0


def stage_activations(cfg: Config, hw: Hardware, vocab_size: int, pp_rank: int) -> dict[str, float]:
    """Activation bytes of pipeline rank ``pp_rank``: per micro-batch of one chunk, in flight, peak."""
    p = cfg.parallel
    pp = p.pipeline_model_parallel_size
    layers = cfg.model.num_layers // pp // _chunks(cfg)
    inputs, stored, working = _recompute_split(cfg, layers)
    full_layer = layer_activation_bytes(cfg, hw, recompute=None if cfg.model.recompute_granularity == "full"
                                        else "config")
    per_chunk = inputs * layer_activation_bytes(cfg, hw, "full") + stored * full_layer
    first, last = pp_rank == 0, pp_rank == pp - 1
    in_flight = in_flight_microbatches(cfg, pp_rank)
    first_extras = (stage_extra_activation_bytes(cfg, hw, vocab_size, first, False)
                    * min(in_flight, cfg.num_microbatches))
    peak = in_flight * per_chunk + first_extras + stage_extra_activation_bytes(cfg, hw, vocab_size, False, last)
    working_set = 0.0
    if working:
        # Full recompute: the backward of the oldest micro-batch re-runs ``working`` layers (the
        # first one's input is the stored checkpoint input), after the layers stored in full and
        # the logits are freed; the other in-flight micro-batches stay stored.
        checkpoint_input = layer_activation_bytes(cfg, hw, "full")
        working_set = working * full_layer - checkpoint_input
        peak = max(peak, (in_flight - 1) * per_chunk + first_extras + inputs * checkpoint_input + working_set)
    return {"per_microbatch": per_chunk + stage_extra_activation_bytes(cfg, hw, vocab_size, first, last),
            "in_flight": in_flight, "recompute_working_set": working_set, "peak": peak,
            "korthikanti": in_flight * layers * korthikanti_layer_bytes(cfg)}


# -- communication --------------------------------------------------------------------------
def _group_bandwidth(span: int, hw: Hardware) -> float:
    """GB/s of a group whose ranks lie within ``span`` consecutive ranks."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def communication(cfg: Config, hw: Hardware, vocab_size: int, params_per_rank: int, pp_rank: int = 0) -> dict:
    """Per step and rank: ``{group: {"ops", "payload", "traffic", "seconds"}}`` (bytes).

    TP, per layer and micro-batch, on ``s b h`` activations: 4 all-reduces (2 forward after the
    row-parallel layers, 2 backward before the column-parallel ones; +2 with full recompute);
    with SP 6 all-gathers and 4 reduce-scatters instead (the backward re-gathers the inputs of
    the column-parallel layers; +2 of each with full recompute); plus the embedding, the logits
    and the cross entropy's three small all-reduces. DP: one all-reduce of the fp32 grads, or a
    reduce-scatter of them and an all-gather of the params with the distributed optimizer.
    PP: one activation forward and one gradient backward per micro-batch and chunk boundary.
    Ring traffic per rank: all-reduce ``2(k-1)/k``, all-gather / reduce-scatter ``(k-1)/k`` of
    the full size.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.training
    s, b, h, tp, sp = _dims(cfg)
    pp, cp, dp = p.pipeline_model_parallel_size, p.context_parallel_size, cfg.data_parallel_size
    beta = activation_dtype_bytes(cfg)
    mb, chunks = cfg.num_microbatches, _chunks(cfg)
    layers = m.num_layers // pp
    act = beta * s * b * h
    first, last = pp_rank == 0, pp_rank == pp - 1
    out = {}
    if tp > 1:
        full = m.recompute_granularity == "full"
        if sp:  # (all-gathers, reduce-scatters) of act, each (t-1)/t of it per rank
            gathers = layers * (8 if full else 6) + (1 if first else 0) + (2 if last else 0)
            scatters = layers * (6 if full else 4) + (1 if first else 0) + (1 if last else 0)
            halves, ops = gathers + scatters, gathers + scatters
        else:
            reduces = layers * (6 if full else 4) + (1 if first else 0) + (1 if last else 0)
            halves, ops = 2 * reduces, reduces
        small = 3 * 4 * s * b if last else 0  # cross entropy: max, target logit, sum of exp
        ops += 3 if last else 0
        out["tp"] = {"ops": mb * ops, "payload": mb * (ops * act + small),
                     "traffic": mb * (halves * act + 2 * small) * (tp - 1) / tp, "span": tp}
    dpc = dp * cp
    if dpc > 1:
        grads = 4 * params_per_rank
        if p.use_distributed_optimizer:
            params = (2 if t.bf16 or t.fp16 else 4) * params_per_rank
            out["dp"] = {"ops": 2, "payload": grads + params, "traffic": (grads + params) * (dpc - 1) / dpc}
        else:
            out["dp"] = {"ops": 1, "payload": grads, "traffic": grads * 2 * (dpc - 1) / dpc}
        out["dp"]["span"] = tp * dpc
    if pp > 1:
        boundary = act / (tp if sp else 1)
        vstages = [v * pp + pp_rank for v in range(chunks)]
        sends = mb * sum((vs < pp * chunks - 1) + (vs > 0) for vs in vstages)
        out["pp"] = {"ops": sends, "payload": sends * boundary, "traffic": sends * boundary,
                     "span": tp * cp * dp * pp}
        if not m.untie_embeddings_and_output_weights and pp_rank in (0, pp - 1):
            emb = 4 * padded_vocab(cfg, vocab_size) // tp * h
            out["embedding"] = {"ops": 1, "payload": emb, "traffic": emb, "span": tp * cp * dp * pp}
    for entry in out.values():
        entry["seconds"] = entry["traffic"] / _group_bandwidth(entry.pop("span"), hw)
    return out


# -- the plan -------------------------------------------------------------------------------
@dataclass
class Plan:
    cfg: Config
    vocab_size: int
    padded_vocab_size: int
    total_params: int
    stages: list[dict] = field(default_factory=list)   # per pipeline rank
    bubble: float = 0.0                                 # bubble time / ideal compute time
    times: dict = field(default_factory=dict)           # seconds per step by part, and "total"
    device_memory: float = 0.0                          # bytes

    @property
    def peak_memory(self) -> float:
        return max(st["memory"] for st in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.device_memory


def plan(cfg: Config, vocab_size: int, hw: Hardware | None = None) -> Plan:
    """Memory per pipeline rank, communication, bubble and estimated step time of ``cfg``."""
    hw = hw or Hardware()
    p = cfg.parallel
    pp = p.pipeline_model_parallel_size
    result = Plan(cfg, vocab_size, padded_vocab(cfg, vocab_size), total_params(cfg, vocab_size),
                  device_memory=hw.device_memory_gb * GiB)
    for rank in range(pp):
        params = stage_params(cfg, vocab_size, rank)
        state = state_bytes(params["total"], cfg)
        acts = stage_activations(cfg, hw, vocab_size, rank)
        comm = communication(cfg, hw, vocab_size, params["total"], rank)
        result.stages.append({"pp_rank": rank, "params": params, "state": state, "activations": acts,
                              "communication": comm, "memory": state["total"] + acts["peak"]})
    chunks, m = _chunks(cfg), cfg.num_microbatches
    result.bubble = (pp - 1) / (chunks * m)
    flops = model_flops_per_iteration(cfg.model, cfg.training.global_batch_size, result.padded_vocab_size,
                                      layers_per_chunk=cfg.model.num_layers // pp // chunks)
    if cfg.model.recompute_granularity == "selective":  # the core attention's forward again
        mdl = cfg.model
        flops += 4 * cfg.training.global_batch_size * mdl.seq_length ** 2 * mdl.hidden_size * mdl.num_layers
    compute = flops / cfg.world_size / (hw.peak_tflops * 1e12 * hw.efficiency)
    comm = {g: max(st["communication"].get(g, {}).get("seconds", 0.0) for st in result.stages)
            for g in ("tp", "pp", "dp", "embedding")}
    if p.overlap_grad_reduce:  # hidden behind the backward pass (about 2/3 of the compute)
        comm["dp"] = max(0.0, comm["dp"] - 2 * compute / 3)
    result.times = {"compute": compute, "bubble": compute * result.bubble, **comm}
    result.times["total"] = sum(result.times.values())
    result.times["flops"] = flops
    return result


def search(cfg: Config, vocab_size: int, hw: Hardware | None = None, include_unfit: bool = False) -> list[Plan]:
    """All layouts (TP, PP, distributed optimizer, recompute; SP on with TP > 1) of
    ``cfg.world_size`` ranks that pass validation, fitting ones first, fastest first."""
    hw = hw or Hardware()
    world = cfg.world_size
    plans = []
    for tp in [d for d in range(1, world + 1) if world % d == 0 and d <= hw.gpus_per_node]:
        for pp in [d for d in range(1, world // tp + 1) if (world // tp) % d == 0]:
            for dist_opt in (False, True):
                for recompute in (None, "selective", "full"):
                    c = copy.deepcopy(cfg)
                    c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size = tp, pp
                    c.parallel.sequence_parallel = tp > 1
                    c.parallel.num_layers_per_virtual_pipeline_stage = None
                    c.parallel.use_distributed_optimizer = dist_opt
                    c.model.recompute_granularity = recompute
                    c.model.recompute_method = "uniform" if recompute == "full" else None
                    c.model.recompute_num_layers = 1 if recompute == "full" else None
                    if dist_opt and world // (tp * pp * c.parallel.context_parallel_size) == 1:
                        continue  # nothing to shard
                    try:
                        validate(c)
                    except ValueError:
                        continue
                    plans.append(plan(c, vocab_size, hw))
    plans = [pl for pl in plans if include_unfit or pl.fits]
    return sorted(plans, key=lambda pl: (not pl.fits, pl.times["total"]))
