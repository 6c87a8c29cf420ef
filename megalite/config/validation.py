"""Validation of a parsed :class:`~megalite.config.Config`: derived defaults, then every
inconsistent flag named in one message (start-up errors, before any process group exists)."""
from __future__ import annotations

# (cfg is a megalite.config.Config; not imported here: the package imports this module)

def validate(cfg: Config) -> None:
    """Fill derived defaults, then raise ValueError naming every inconsistent flag (one message).

    Whether optional packages (flash-attn, transformer-engine, tensorboard, wandb) are installed
    is checked where they are used (``pretrain_gpt.py``, the backends), not here."""
    errors = _check_positive(cfg)
    if errors:
        raise ValueError("; ".join(errors))
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if cfg.world_size % (tp * pp * cp):
        raise ValueError(f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size {tp} "
                         f"x --pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
    fill_defaults(cfg)
    errors = (_check_model(cfg) + _check_parallel(cfg) + _check_training_and_data(cfg) + _check_logging(cfg)
              + check_moe(cfg))
    if errors:
        raise ValueError("; ".join(errors))


def fill_defaults(cfg: Config) -> None:
    """Derived defaults: global batch (micro batch x DP), query groups (heads), position table
    (seq length), FFN size (Megatron's 4h or the SwiGLU 8/3 rule), LR decay iterations."""
    m, t = cfg.model, cfg.training
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * cfg.data_parallel_size
    if not m.group_query_attention:
        m.num_query_groups = m.num_attention_heads
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.ffn_hidden_size is None:  # Megatron's rule: 4h, or 2/3 of it rounded down to 64 for SwiGLU
        m.ffn_hidden_size = (max(64, int(4 * m.hidden_size * 2 / 3 / 64) * 64) if m.swiglu
                             else 4 * m.hidden_size)
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters


def _check_positive(cfg: Config) -> list[str]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    values = (("--tensor-model-parallel-size", p.tensor_model_parallel_size),
              ("--pipeline-model-parallel-size", p.pipeline_model_parallel_size),
              ("--context-parallel-size", p.context_parallel_size), ("--num-layers", m.num_layers),
              ("--hidden-size", m.hidden_size), ("--num-attention-heads", m.num_attention_heads),
              ("--seq-length", m.seq_length), ("--micro-batch-size", t.micro_batch_size),
              ("--train-iters", t.train_iters), ("--log-interval", cfg.logging.log_interval),
              ("--max-consecutive-nan-iterations", t.max_consecutive_nan_iterations))
    return [f"{name} must be >= 1, got {value}" for name, value in values if value < 1]


def _check_model(cfg: Config) -> list[str]:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    errors = []
    if m.hidden_size % m.num_attention_heads:
        errors.append(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    if m.num_attention_heads % tp:
        errors.append(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                      f"--tensor-model-parallel-size {tp}")
    if m.group_query_attention:
        if m.num_query_groups is None:
            errors.append("--group-query-attention needs --num-query-groups")
        elif m.num_attention_heads % m.num_query_groups or m.num_query_groups % tp:
            errors.append(f"--num-query-groups {m.num_query_groups} must divide --num-attention-heads "
                          f"{m.num_attention_heads} and be divisible by --tensor-model-parallel-size {tp}")
    if m.position_embedding_type == "learned_absolute" and m.seq_length > m.max_position_embeddings:
        errors.append(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if m.recompute_granularity == "full" and m.recompute_method is None:
        errors.append("--recompute-granularity full needs --recompute-method uniform|block")
    return errors


def _check_parallel(cfg: Config) -> list[str]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    errors = []
    if t.global_batch_size % (t.micro_batch_size * cfg.data_parallel_size):
        errors.append(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                      f"{t.micro_batch_size} x data-parallel size {cfg.data_parallel_size}")
    if m.num_layers % pp:
        errors.append(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    elif p.num_layers_per_virtual_pipeline_stage is not None:
        errors += _check_virtual_stages(cfg, batch_ok=not errors)
    if p.pipeline_schedule == "gpipe" and p.num_layers_per_virtual_pipeline_stage is not None:
        errors.append("--pipeline-schedule gpipe does not support --num-layers-per-virtual-pipeline-stage "
                      "(virtual stages use the interleaved 1F1B schedule)")
    if p.pipeline_schedule == "zb-h1" and pp == 1:
        errors.append("--pipeline-schedule zb-h1 needs --pipeline-model-parallel-size > 1 (it splits the "
                      "backward to fill the pipeline bubble; with one stage there is none)")
    if p.pipeline_schedule == "zb-h1" and p.num_layers_per_virtual_pipeline_stage is not None:
        errors.append("--pipeline-schedule zb-h1 does not support --num-layers-per-virtual-pipeline-stage "
                      "(no interleaved zero-bubble schedule: use zb-h1 or the interleaved 1F1B, not both)")
    if p.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel requires --tensor-model-parallel-size > 1")
    if p.sequence_parallel and (m.seq_length // cp) % tp:
        errors.append(f"--sequence-parallel needs --seq-length {m.seq_length} (per context-parallel rank) "
                      f"divisible by --tensor-model-parallel-size {tp}")
    if cp > 1 and m.seq_length % (2 * cp):
        errors.append(f"--seq-length {m.seq_length} must be divisible by 2 x --context-parallel-size {cp}")
    return errors


def _check_virtual_stages(cfg: Config, batch_ok: bool) -> list[str]:
    pp, per_virtual = cfg.parallel.pipeline_model_parallel_size, cfg.parallel.num_layers_per_virtual_pipeline_stage
    per_stage = cfg.model.num_layers // pp
    if pp < 2:
        return ["--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"]
    if per_stage % per_virtual:
        return [f"--num-layers {cfg.model.num_layers} / --pipeline-model-parallel-size {pp} = {per_stage} layers "
                f"per stage is not divisible by --num-layers-per-virtual-pipeline-stage {per_virtual}"]
    if batch_ok and cfg.num_microbatches % pp:
        return [f"interleaved pipeline schedule needs the number of micro-batches "
                f"({cfg.num_microbatches} = global batch / (micro batch x DP)) to be a multiple of "
                f"--pipeline-model-parallel-size {pp}"]
    return []


def _check_training_and_data(cfg: Config) -> list[str]:
    t, d = cfg.training, cfg.data
    errors = []
    if t.bf16 and t.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if d.mock_data and d.data_path:
        errors.append("--mock-data and --data-path are mutually exclusive")
    if d.data_path and not d.tokenizer_type:
        errors.append("--data-path needs --tokenizer-type (and its files) to know the vocabulary")
    if d.data_path and len(d.data_path) > 1 and len(d.data_path) % 2:
        errors.append(f"--data-path with several datasets takes weight/prefix pairs, got {len(d.data_path)} values")
    packed = [name for name, on in (("--reset-position-ids", d.reset_position_ids),
                                    ("--reset-attention-mask", d.reset_attention_mask),
                                    ("--eod-mask-loss", d.eod_mask_loss)) if on]
    if d.mock_data and packed:
        errors.append(f"{' / '.join(packed)} need data with end-of-document tokens; --mock-data has none")
    return errors


def _check_logging(cfg: Config) -> list[str]:
    lg = cfg.logging
    errors = []
    if not lg.wandb_project and (lg.wandb_exp_name or lg.wandb_save_dir):
        errors.append("--wandb-exp-name / --wandb-save-dir need --wandb-project")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        errors.append(f"--peak-tflops must be > 0, got {lg.peak_tflops}")
    return errors


def moe_layer_pattern(freq: str, num_layers: int) -> list[int]:
    """``--moe-layer-freq`` as one 0/1 per layer (1: MoE). An int N makes every N-th layer MoE,
    starting with the first (Megatron-LM); a list expression of 0/1, ``+`` and ``*`` gives the
    pattern itself. The expression is evaluated from its syntax tree, never by ``eval``."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"--moe-layer-freq {freq!r}: expected an int or a list expression such as '([0]+[1]*3)*2'")
    try:
        parsed = value(ast.parse(freq.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"--moe-layer-freq {freq!r}: expected an int or a list expression such as '[0,1,1,1]'")
    if isinstance(parsed, int):
        if parsed < 1:
            raise ValueError(f"--moe-layer-freq {freq!r} must be >= 1")
        return [int(i % parsed == 0) for i in range(num_layers)]
    if not isinstance(parsed, list) or len(parsed) != num_layers or set(parsed) - {0, 1}:
        raise ValueError(f"--moe-layer-freq {freq!r} must list 0 or 1 for each of the --num-layers {num_layers} layers")
    return parsed


def check_moe(cfg: Config) -> list[str]:
    """Start-up errors of the MoE flags (experts vs expert parallelism, router, capacity)."""
    m, p = cfg.model, cfg.parallel
    ep, tp, pp = p.expert_model_parallel_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    if m.num_experts is None:
        return ([f"--expert-model-parallel-size {ep} / --expert-tensor-parallel-size need --num-experts"]
                if ep != 1 or p.expert_tensor_parallel_size is not None else [])
    errors = []
    if m.num_experts < 1 or ep < 1 or etp < 1 or m.moe_router_topk < 1:
        return ["--num-experts, --expert-model-parallel-size, --expert-tensor-parallel-size and "
                "--moe-router-topk must be >= 1"]
    if m.num_experts % ep:
        errors.append(f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    if cfg.world_size % (ep * etp * pp):
        errors.append(f"world size {cfg.world_size} is not divisible by --expert-model-parallel-size {ep} x "
                      f"--expert-tensor-parallel-size {etp} x --pipeline-model-parallel-size {pp}")
    if m.moe_router_topk > m.num_experts:
        errors.append(f"--moe-router-topk {m.moe_router_topk} exceeds --num-experts {m.num_experts}")
    if tp > 1 and not p.sequence_parallel:
        errors.append("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (as Megatron-Core: "
                      "each TP rank routes its own sequence shard)")
    if (m.moe_ffn_hidden_size or m.ffn_hidden_size or 0) % etp:
        errors.append(f"--moe-ffn-hidden-size {m.moe_ffn_hidden_size or m.ffn_hidden_size} is not divisible by "
                      f"--expert-tensor-parallel-size {etp}")
    if m.moe_shared_expert_intermediate_size is not None and m.moe_shared_expert_intermediate_size % tp:
        errors.append(f"--moe-shared-expert-intermediate-size {m.moe_shared_expert_intermediate_size} is not "
                      f"divisible by --tensor-model-parallel-size {tp}")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        errors.append("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
    if m.moe_router_pre_softmax and m.moe_router_score_function != "softmax":
        errors.append("--moe-router-pre-softmax needs --moe-router-score-function softmax")
    if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
        errors.append("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if m.moe_expert_capacity_factor is not None and m.moe_expert_capacity_factor <= 0:
        errors.append(f"--moe-expert-capacity-factor must be > 0, got {m.moe_expert_capacity_factor}")
    try:
        moe_layer_pattern(m.moe_layer_freq, m.num_layers)
    except ValueError as e:
        errors.append(str(e))
    return errors
