"""Megatron-LM (megatron-core GPTModel) <-> megalite: model flags, tensor names and TP layouts, on CPU.

Everything here works on *full* tensors keyed by names; reading and writing Megatron's files is
:mod:`.legacy` (the legacy ``mp_rank_*`` format) and :mod:`.torch_dist` (``torch_dist``).

A *Megatron full* state dict is megatron-core's ``GPTModel`` state dict with every tensor-parallel
shard merged (the TP=1 tensor), global layer indices (``decoder.layers.{i}`` counts over the whole
model, whatever the pipeline split) and the local layer spec's names. Transformer-Engine specs
fuse the norms into the next linear layer (``self_attention.linear_qkv.layer_norm_weight`` for
``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_weight`` for ``pre_mlp_layernorm.weight``):
:func:`canonical_name` maps those to the local names, :func:`transformer_engine_names` back.

The tensors need no reordering: megatron-core's ``linear_qkv`` rows are ``[q_1..q_k, k, v]`` per
key/value group and a SwiGLU ``linear_fc1`` is ``[gate; up]`` (per TP rank ``[gate_r; up_r]``),
exactly megalite's ``attention.qkv`` and ``mlp.fc1``. RoPE is the non-interleaved form in both.
Only the vocabulary differs: Megatron keeps ``padded_vocab_size`` rows (padding rows are ordinary
logits there), megalite stores the real vocabulary and masks its in-memory padding.
"""
from __future__ import annotations

import types

import torch

from ...checkpointing.format import assemble, shard_for
from .. import ConversionError

# (megalite layer suffix, megatron-core local-spec suffix, Transformer-Engine-spec suffix)
LAYER_NAMES = [
    ("norm_1.weight", "input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("norm_1.bias", "input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("attention.qkv.weight", "self_attention.linear_qkv.weight", None),
    ("attention.qkv.bias", "self_attention.linear_qkv.bias", None),
    ("attention.proj.weight", "self_attention.linear_proj.weight", None),
    ("attention.proj.bias", "self_attention.linear_proj.bias", None),
    ("norm_2.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("norm_2.bias", "pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", None),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias", None),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", None),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias", None),
]
GLOBAL_NAMES = [
    ("word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("position_embeddings.weight", "embedding.position_embeddings.weight"),
    ("final_norm.weight", "decoder.final_layernorm.weight"),
    ("final_norm.bias", "decoder.final_layernorm.bias"),
    ("output_layer.weight", "output_layer.weight"),
]
LAYER_PREFIX = "decoder.layers."
VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")
_TE_TO_LOCAL = {te: local for _, local, te in LAYER_NAMES if te}
_LOCAL_TO_TE = {local: te for te, local in _TE_TO_LOCAL.items()}
# Linear layers with a ``_extra_state`` entry in megatron-core's state dict (local spec: None).
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2")
TE_EXTRA_STATE_MODULES = EXTRA_STATE_MODULES + ("self_attention.core_attention",)
# Megatron tokenizers megalite has under the same name (and flags).
TOKENIZERS = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer")


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> ``(3, "mlp.linear_fc1.weight")``; None otherwise."""
    if not name.startswith(LAYER_PREFIX):
        return None
    index, _, suffix = name[len(LAYER_PREFIX):].partition(".")
    return (int(index), suffix) if index.isdigit() else None


def canonical_name(name: str) -> str:
    """The local-spec name of a megatron-core tensor name (Transformer-Engine fused norms renamed)."""
    layer = split_layer_name(name)
    if layer is None or layer[1] not in _TE_TO_LOCAL:
        return name
    return f"{LAYER_PREFIX}{layer[0]}.{_TE_TO_LOCAL[layer[1]]}"


def transformer_engine_names(sd: dict) -> dict:
    """``sd`` with the norms renamed as a Transformer-Engine layer spec names them."""
    out = {}
    for name, value in sd.items():
        layer = split_layer_name(name)
        if layer is not None and layer[1] in _LOCAL_TO_TE:
            name = f"{LAYER_PREFIX}{layer[0]}.{_LOCAL_TO_TE[layer[1]]}"
        out[name] = value
    return out


# -- model flags ---------------------------------------------------------------------------
def _get(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def _refuse_unsupported(args) -> None:
    """One clear message per Megatron feature that megalite's GPT has no equivalent of."""
    checks = [
        (_get(args, "num_experts", 0), "--num-experts (MoE)"),
        (_get(args, "multi_latent_attention", False), "--multi-latent-attention"),
        (_get(args, "qk_layernorm", False), "--qk-layernorm"),
        (_get(args, "apply_layernorm_1p", False) or _get(args, "layernorm_zero_centered_gamma", False),
         "--apply-layernorm-1p (zero-centred gamma)"),
        (_get(args, "squared_relu", False), "--squared-relu"),
        (_get(args, "apply_residual_connection_post_layernorm", False),
         "--apply-residual-connection-post-layernorm"),
        (_get(args, "rotary_interleaved", False), "--rotary-interleaved"),
        (float(_get(args, "rotary_percent", 1.0)) != 1.0, f"--rotary-percent {_get(args, 'rotary_percent')}"),
        (_get(args, "use_rope_scaling", False) or _get(args, "rotary_seq_len_interpolation_factor", None),
         "scaled RoPE (--use-rope-scaling / --rotary-seq-len-interpolation-factor)"),
        (_get(args, "mtp_num_layers", 0), "--mtp-num-layers (multi-token prediction)"),
        (_get(args, "window_size", None), "--window-size (sliding-window attention)"),
        (_get(args, "heterogeneous_layers_config_path", None), "heterogeneous layers"),
        (_get(args, "hybrid_override_pattern", None) or _get(args, "hybrid_layer_pattern", None),
         "hybrid (Mamba) layers"),
        (_get(args, "spec", None), f"a custom --spec {_get(args, 'spec')}"),
    ]
    bad = [what for present, what in checks if present]
    if bad:
        raise ConversionError("Megatron checkpoint uses " + ", ".join(bad) + ": megalite's GPT has no equivalent")


def model_config_from_args(args) -> dict:
    """megalite ModelConfig fields of a Megatron-LM run, from its saved ``args`` namespace."""
    _refuse_unsupported(args)
    h, heads = args.hidden_size, args.num_attention_heads
    kv = _get(args, "kv_channels", h // heads)
    if kv * heads != h:
        raise ConversionError(f"--kv-channels {kv} x --num-attention-heads {heads} != --hidden-size {h}: "
                              "megalite's head dim is hidden / heads")
    gqa = bool(_get(args, "group_query_attention", False))
    groups = _get(args, "num_query_groups", heads) if gqa else heads
    position = _get(args, "position_embedding_type", "learned_absolute")
    if _get(args, "use_rotary_position_embeddings", False) and position == "learned_absolute":
        position = "rope"  # the flag older Megatron-LM runs used
    if position not in ("learned_absolute", "rope") or (position == "learned_absolute"
                                                       and not _get(args, "add_position_embedding", True)):
        raise ConversionError(f"--position-embedding-type {position} (or no position embedding): "
                              "megalite has learned_absolute and rope")
    bias, qkv_bias = bool(_get(args, "add_bias_linear", True)), bool(_get(args, "add_qkv_bias", False))
    if qkv_bias and not bias:
        raise ConversionError("--add-qkv-bias without --add-bias-linear: megalite has one switch for all "
                              "linear biases (--disable-bias-linear)")
    seq = _get(args, "seq_length", None) or _get(args, "max_position_embeddings")
    base = float(_get(args, "rotary_base", 10000))
    if base != int(base):
        raise ConversionError(f"--rotary-base {base} is not an integer (megalite's --rotary-base is)")
    swiglu = bool(_get(args, "swiglu", False))
    return dict(num_layers=args.num_layers, hidden_size=h,
                ffn_hidden_size=_get(args, "ffn_hidden_size", 4 * h), num_attention_heads=heads,
                group_query_attention=groups != heads, num_query_groups=groups, seq_length=seq,
                max_position_embeddings=_get(args, "max_position_embeddings", seq),
                position_embedding_type=position, rotary_base=int(base),
                normalization=_get(args, "normalization", "LayerNorm"),
                norm_epsilon=float(_get(args, "norm_epsilon", 1e-5)), swiglu=swiglu,
                openai_gelu=bool(_get(args, "openai_gelu", False)) and not swiglu, disable_bias_linear=not bias,
                untie_embeddings_and_output_weights=bool(_get(args, "untie_embeddings_and_output_weights", False)),
                init_method_std=float(_get(args, "init_method_std", 0.02)),
                attention_dropout=float(_get(args, "attention_dropout", 0.1)),
                hidden_dropout=float(_get(args, "hidden_dropout", 0.1)))


def args_from_model_config(m: dict, padded_vocab: int, tp: int, pp: int, vpp: int | None = None,
                           dtype: torch.dtype = torch.float32, transformer_impl: str = "local",
                           ckpt_format: str = "torch", make_vocab_size_divisible_by: int = 128,
                           data: dict | None = None, true_vocab: int | None = None) -> dict:
    """The Megatron-LM arguments that rebuild megalite model ``m`` (what ``load_args_from_checkpoint``
    and ``check_checkpoint_args`` read), as a plain dict for an ``argparse.Namespace``. Only
    tokenizers Megatron has are recorded; ``true_vocab_size`` (which Megatron ignores) keeps the
    real vocabulary below the padding for the way back."""
    heads = m["num_attention_heads"]
    data = data if (data or {}).get("tokenizer_type") in TOKENIZERS else {}
    args = dict(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
        num_attention_heads=heads, kv_channels=m["hidden_size"] // heads,
        group_query_attention=m["num_query_groups"] != heads, num_query_groups=m["num_query_groups"],
        seq_length=m["seq_length"], max_position_embeddings=m["max_position_embeddings"],
        position_embedding_type=m["position_embedding_type"],
        add_position_embedding=m["position_embedding_type"] == "learned_absolute",
        use_rotary_position_embeddings=m["position_embedding_type"] == "rope", rotary_base=m["rotary_base"],
        rotary_percent=1.0, rotary_interleaved=False, normalization=m["normalization"],
        norm_epsilon=m["norm_epsilon"], apply_layernorm_1p=False, swiglu=m["swiglu"], squared_relu=False,
        openai_gelu=bool(m.get("openai_gelu")), add_bias_linear=not m["disable_bias_linear"],
        add_qkv_bias=not m["disable_bias_linear"], qk_layernorm=False,
        untie_embeddings_and_output_weights=m["untie_embeddings_and_output_weights"],
        apply_query_key_layer_scaling=False, init_method_std=m["init_method_std"],
        attention_dropout=m["attention_dropout"], hidden_dropout=m["hidden_dropout"],
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        vocab_size=data.get("vocab_size"), tokenizer_type=data.get("tokenizer_type"),
        vocab_file=data.get("vocab_file"), merge_file=data.get("merge_file"),
        tokenizer_model=data.get("tokenizer_model"), tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_per_virtual_pipeline_stage=m["num_layers"] // (pp * vpp) if vpp else None,
        expert_model_parallel_size=1, num_experts=None, use_mcore_models=True, use_legacy_models=False,
        transformer_impl=transformer_impl, ckpt_format=ckpt_format, params_dtype=dtype,
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, consumed_train_samples=0,
        consumed_valid_samples=0, iteration=0, true_vocab_size=true_vocab)
    return args


def tokenizer_data(args) -> dict:
    """megalite DataConfig fields for the tokenizer a Megatron run used, when megalite has it."""
    kind = _get(args, "tokenizer_type", None)
    if kind not in TOKENIZERS:
        return {}
    fields = {"tokenizer_type": kind}
    for name in ("vocab_file", "merge_file", "tokenizer_model") + (("vocab_size",) if kind == "NullTokenizer" else ()):
        if _get(args, name, None) is not None:
            fields[name] = _get(args, name)
    return fields


def megatron_flags(a: dict) -> list[str]:
    """The Megatron-LM ``pretrain_gpt.py`` model and layout flags of args ``a``."""
    flags = ["--num-layers", a["num_layers"], "--hidden-size", a["hidden_size"], "--ffn-hidden-size",
             a["ffn_hidden_size"], "--num-attention-heads", a["num_attention_heads"]]
    if a["group_query_attention"]:
        flags += ["--group-query-attention", "--num-query-groups", a["num_query_groups"]]
    flags += ["--seq-length", a["seq_length"], "--max-position-embeddings", a["max_position_embeddings"],
              "--position-embedding-type", a["position_embedding_type"], "--normalization", a["normalization"],
              "--norm-epsilon", a["norm_epsilon"]]
    if a["position_embedding_type"] == "rope":
        flags += ["--rotary-base", a["rotary_base"]]
    for name, on in (("swiglu", a["swiglu"]), ("openai-gelu", a["openai_gelu"]),
                     ("disable-bias-linear", not a["add_bias_linear"]),
                     ("untie-embeddings-and-output-weights", a["untie_embeddings_and_output_weights"])):
        if on:
            flags.append("--" + name)
    flags += ["--make-vocab-size-divisible-by", a["make_vocab_size_divisible_by"], "--tensor-model-parallel-size",
              a["tensor_model_parallel_size"], "--pipeline-model-parallel-size", a["pipeline_model_parallel_size"]]
    if a["virtual_pipeline_model_parallel_size"]:
        flags += ["--num-layers-per-virtual-pipeline-stage", a["num_layers_per_virtual_pipeline_stage"]]
    flags += ["--ckpt-format", a["ckpt_format"], "--transformer-impl", a["transformer_impl"]]
    return [str(f) for f in flags]


def check_target_layout(m: dict, tp: int, pp: int, vpp: int | None) -> None:
    """Refuse a Megatron layout that megatron-core cannot build for model ``m`` (and MoE models)."""
    if m.get("num_experts"):
        raise ConversionError(f"--num-experts {m['num_experts']} (MoE): megalite-to-megatron converts dense "
                              "GPT models only")
    checks = [(m["num_attention_heads"] % tp, f"{m['num_attention_heads']} heads"),
              (m["num_query_groups"] % tp, f"{m['num_query_groups']} query groups"),
              (m["ffn_hidden_size"] % tp, f"FFN size {m['ffn_hidden_size']}")]
    bad = [what for rest, what in checks if rest]
    if bad:
        raise ConversionError(f"{', '.join(bad)} not divisible by --target-tensor-parallel-size {tp}")
    if m["num_layers"] % (pp * (vpp or 1)):
        raise ConversionError(f"{m['num_layers']} layers do not split into {pp} pipeline stages"
                              + (f" x {vpp} virtual stages" if vpp else ""))


# -- names ---------------------------------------------------------------------------------
def megalite_names(m: dict) -> list[tuple[str, str]]:
    """``(megalite global name, Megatron full name)`` of every tensor of model ``m``."""
    bias, layer_norm = not m["disable_bias_linear"], m["normalization"] == "LayerNorm"
    rows = []
    for ours, theirs in GLOBAL_NAMES:
        if ours == "position_embeddings.weight" and m["position_embedding_type"] != "learned_absolute":
            continue
        if ours == "final_norm.bias" and not layer_norm:
            continue
        if ours == "output_layer.weight" and not m["untie_embeddings_and_output_weights"]:
            continue
        rows.append((ours, theirs))
    for i in range(m["num_layers"]):
        for ours, theirs, _ in LAYER_NAMES:
            is_norm = ours.startswith("norm_")
            if ours.endswith(".bias") and not (layer_norm if is_norm else bias):
                continue
            rows.append((f"layers.{i}.{ours}", f"{LAYER_PREFIX}{i}.{theirs}"))
    return rows


def full_shape(ours: str, m: dict, vocab: int) -> tuple[int, ...]:
    """The shape of megalite full tensor ``ours`` of model ``m`` (vocabulary ``vocab`` rows)."""
    h, heads, groups = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    ffn = m["ffn_hidden_size"] * (2 if m["swiglu"] else 1)
    rows = {"word_embeddings": vocab, "output_layer": vocab, "position_embeddings": m["max_position_embeddings"],
            "attention.qkv": (heads + 2 * groups) * (h // heads), "mlp.fc1": ffn}
    module, kind = ours.rsplit(".", 1)
    module = module.split(".", 2)[-1] if module.startswith("layers.") else module
    first = rows.get(module, h)
    if kind == "bias" or module.startswith(("norm_", "final_norm")):
        return (first,)
    return (first, m["ffn_hidden_size"] if module == "mlp.fc2" else h)


def megatron_to_megalite(sd: dict, m: dict, vocab: int) -> dict[str, torch.Tensor]:
    """megalite full tensors from a Megatron full state dict (either spec's names; ``_extra_state``
    entries ignored); the vocabulary tables are cut to the first ``vocab`` rows."""
    sd = {canonical_name(k): v for k, v in sd.items() if not k.endswith("_extra_state")}
    used, full = set(), {}
    for ours, theirs in megalite_names(m):
        if theirs not in sd:
            raise ConversionError(f"Megatron checkpoint has no tensor {theirs!r} (needed for megalite {ours!r})")
        used.add(theirs)
        t = sd[theirs]
        if theirs in VOCAB_TABLES:
            if t.shape[0] < vocab:
                raise ConversionError(f"{theirs} has {t.shape[0]} rows, fewer than the vocabulary {vocab}")
            t = t[:vocab]
        expected = full_shape(ours, m, vocab)
        if tuple(t.shape) != expected:
            raise ConversionError(f"Megatron tensor {theirs!r} has shape {tuple(t.shape)}, the model in the "
                                  f"checkpoint's args needs {expected}")
        full[ours] = t.contiguous()
    left = sorted(k for k in sd if k not in used)
    if left == ["output_layer.weight"] and not m["untie_embeddings_and_output_weights"]:
        if not torch.equal(sd["output_layer.weight"], sd["embedding.word_embeddings.weight"]):
            raise ConversionError("tied embeddings, yet the last stage's output_layer.weight differs from "
                                  "embedding.word_embeddings.weight")
        left = []
    if left:
        raise ConversionError(f"Megatron tensors with no megalite counterpart: {left[:8]}")
    return full


def megalite_to_megatron(full: dict, m: dict, padded_vocab: int) -> dict[str, torch.Tensor]:
    """A Megatron full state dict (local-spec names) from megalite full tensors; the vocabulary
    tables are padded with zero rows to ``padded_vocab`` (Megatron's ``--make-vocab-size-divisible-by``
    x TP rule)."""
    out, unused = {}, set(full)
    for ours, theirs in megalite_names(m):
        if ours not in full:
            raise ConversionError(f"megalite checkpoint has no tensor {ours!r}")
        unused.discard(ours)
        t = full[ours]
        expected = full_shape(ours, m, t.shape[0] if theirs in VOCAB_TABLES else 0)  # any vocabulary
        if tuple(t.shape) != expected:
            raise ConversionError(f"megalite tensor {ours!r} has shape {tuple(t.shape)}, its model config "
                                  f"needs {expected}")
        if theirs in VOCAB_TABLES and t.shape[0] < padded_vocab:
            t = torch.cat([t, t.new_zeros((padded_vocab - t.shape[0],) + tuple(t.shape[1:]))])
        out[theirs] = t.contiguous().clone()
    if unused:
        raise ConversionError(f"megalite tensors with no Megatron counterpart: {sorted(unused)[:8]}")
    return out


# -- tensor parallelism --------------------------------------------------------------------
def tp_layout(name: str, swiglu: bool) -> tuple[int | None, int]:
    """``(partition dim or None, parts)`` of a Megatron full tensor over TP ranks: column-parallel
    QKV / fc1 / vocabulary tables on dim 0 (SwiGLU fc1 as ``[gate_r; up_r]``: 2 parts), row-parallel
    proj / fc2 weights on dim 1, everything else replicated."""
    suffix = split_layer_name(canonical_name(name))
    suffix = suffix[1] if suffix else name
    if name in VOCAB_TABLES or suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return 0, 1
    if suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        return 0, 2 if swiglu else 1
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return 1, 1
    return None, 1


def merge_tp(name: str, shards: list[torch.Tensor], swiglu: bool) -> torch.Tensor:
    """The full tensor from the shards of TP ranks ``0..len(shards)-1``."""
    dim, parts = tp_layout(name, swiglu)
    if dim is None or len(shards) == 1:
        return shards[0]
    return assemble([{"tensor": t, "partition_dim": dim, "parts": parts, "tp_rank": r, "tp_size": len(shards),
                      "real_rows": None} for r, t in enumerate(shards)])


def split_tp(name: str, full: torch.Tensor, tp: int, tp_rank: int, swiglu: bool) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of a Megatron full tensor."""
    dim, parts = tp_layout(name, swiglu)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % (tp * parts):
        raise ConversionError(f"{name}: {full.shape[dim]} rows/cols do not split over TP {tp}")
    fake = types.SimpleNamespace(tensor_model_parallel=True, partition_dim=dim, parts=parts, real_rows=None)
    return shard_for(full, fake, tp_rank, tp).contiguous()
