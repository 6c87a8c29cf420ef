"""Hugging Face GPT-2 / Llama / Mixtral <-> megalite: configs, tensor names and layouts, on CPU.

Everything here works on *full* tensors (the TP=1, unpadded layout of megalite/checkpointing/format.py)
keyed by megalite's global names; no training model is built. The name mapping is
:func:`_global_map` / :func:`_layer_map` (table in docs/checkpoints.md). Layout differences:
megalite fuses QKV rows per key/value group ``[q_1..q_k, k, v]`` (HF GPT-2: one Conv1D
``[h, 3h]`` with q|k|v column blocks; HF Llama: separate q/k/v_proj); SwiGLU fc1 is
``[gate; up]``; GPT-2's Conv1D weights are ``[in, out]`` (transposed). RoPE is the
non-interleaved ``rotate_half`` form in both megalite and HF Llama, so q/k rows need no
permutation. GPT-2's ``gelu_new`` is megalite's ``--openai-gelu`` (tanh GELU). Mixtral is Llama with every
MLP an MoE layer: its router (``block_sparse_moe.gate``: softmax, top-k, renormalised, which is
megalite's default softmax-after-top-k) and experts ``w1`` (gate), ``w3`` (up), ``w2`` (down),
the per-expert form that ``transformers`` writes and reads (its in-memory fused
``mlp.experts.gate_up_proj`` / ``down_proj`` are accepted too). Qwen2-MoE (gated shared expert)
and OLMoE (QK-norm) need layers megalite does not have and are refused.
"""
from __future__ import annotations

import torch

from .. import ConversionError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# HF tensors that are buffers of older checkpoints, not weights: dropped on the way in.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# -- configs -------------------------------------------------------------------------------
def detect_hf_arch(hf: dict) -> str:
    kind = hf.get("model_type") or ""
    arches = " ".join(hf.get("architectures") or [])
    for arch, cls in ARCHITECTURES.items():
        if kind == arch or cls in arches:
            return arch
    raise ConversionError(f"unsupported Hugging Face model_type {kind!r} ({arches or 'no architectures'}): "
                          "only GPT-2 (gpt2), Llama (llama) and Mixtral (mixtral) are supported")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def model_config_from_hf(hf: dict) -> tuple[str, dict, int]:
    """``(arch, megalite ModelConfig fields, vocab size)`` of an HF ``config.json`` dict."""
    arch = detect_hf_arch(hf)
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        _require(act in GPT2_TANH_GELUS + ("gelu",), f"GPT-2 activation_function {act!r}: only gelu_new/gelu")
        _require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False)
                 and not hf.get("add_cross_attention", False),
                 "GPT-2 with scale_attn_by_inverse_layer_idx, cross attention or unscaled attention is not supported")
        h, heads = hf["n_embd"], hf["n_head"]
        fields = dict(num_layers=hf["n_layer"], hidden_size=h, ffn_hidden_size=hf.get("n_inner") or 4 * h,
                      num_attention_heads=heads, group_query_attention=False, num_query_groups=heads,
                      seq_length=hf["n_positions"], max_position_embeddings=hf["n_positions"],
                      position_embedding_type="learned_absolute", normalization="LayerNorm",
                      norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), swiglu=False,
                      openai_gelu=act in GPT2_TANH_GELUS, disable_bias_linear=False,
                      untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
                      attention_dropout=hf.get("attn_pdrop", 0.0), hidden_dropout=hf.get("resid_pdrop", 0.0),
                      init_method_std=hf.get("initializer_range", 0.02))
    else:  # Llama, Mixtral
        h, heads = hf["hidden_size"], hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        _require(hf.get("hidden_act", "silu") == "silu", f"Llama hidden_act {hf.get('hidden_act')!r}: only silu")
        _require(hf.get("head_dim") in (None, h // heads),
                 f"Llama head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads = {h // heads}")
        rope = dict(hf.get("rope_scaling") or {}, **(hf.get("rope_parameters") or {}))
        kind = rope.get("rope_type", rope.get("type", "default"))
        _require(kind == "default", f"Llama rope_type {kind!r}: only the default (unscaled) RoPE is supported")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        _require(theta == int(theta), f"rope_theta {theta} is not an integer (megalite --rotary-base is)")
        bias = bool(hf.get("attention_bias", False))
        _require(bias == bool(hf.get("mlp_bias", False)), "Llama attention_bias != mlp_bias: megalite has "
                 "one switch for all linear biases (--disable-bias-linear)")
        fields = dict(num_layers=hf["num_hidden_layers"], hidden_size=h, ffn_hidden_size=hf["intermediate_size"],
                      num_attention_heads=heads, group_query_attention=groups != heads, num_query_groups=groups,
                      seq_length=hf["max_position_embeddings"],
                      max_position_embeddings=hf["max_position_embeddings"], position_embedding_type="rope",
                      rotary_base=int(theta), normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6),
                      swiglu=True, openai_gelu=False, disable_bias_linear=not bias,
                      untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
                      attention_dropout=hf.get("attention_dropout", 0.0), hidden_dropout=0.0,
                      init_method_std=hf.get("initializer_range", 0.02))
        if arch == "mixtral":
            _require(hf.get("sliding_window") in (None, 0) or hf["sliding_window"] >= hf["max_position_embeddings"],
                     f"Mixtral sliding_window {hf.get('sliding_window')}: megalite has no sliding-window attention")
            fields.update(num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                          moe_ffn_hidden_size=hf["intermediate_size"],
                          moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0))
    return arch, fields, hf["vocab_size"]


def detect_megalite_arch(m: dict) -> str:
    """gpt2 for LayerNorm + learned positions + GELU, llama for RMSNorm + RoPE + SwiGLU (mixtral
    with experts in every layer)."""
    if m.get("num_experts"):
        _require((m["normalization"], m["position_embedding_type"], m["swiglu"]) == ("RMSNorm", "rope", True)
                 and m.get("moe_layer_freq", "1") == "1" and not m.get("moe_shared_expert_intermediate_size")
                 and m.get("moe_router_score_function", "softmax") == "softmax"
                 and not m.get("moe_router_pre_softmax") and m["disable_bias_linear"],
                 "an MoE model exports as Mixtral only with RMSNorm + rope + --swiglu, --disable-bias-linear, "
                 "experts in every layer (--moe-layer-freq 1), no shared expert, softmax-after-top-k routing")
        return "mixtral"
    if (m["normalization"], m["position_embedding_type"], m["swiglu"]) == ("LayerNorm", "learned_absolute", False):
        return "gpt2"
    if (m["normalization"], m["position_embedding_type"], m["swiglu"]) == ("RMSNorm", "rope", True):
        return "llama"
    raise ConversionError(f"no Hugging Face equivalent of --normalization {m['normalization']} "
                          f"--position-embedding-type {m['position_embedding_type']} swiglu={m['swiglu']}: "
                          "GPT-2 needs LayerNorm + learned_absolute + GELU, Llama RMSNorm + rope + --swiglu")


def hf_config_from_megalite(arch: str, m: dict, vocab: int, dtype: torch.dtype = torch.float32, eod=None):
    """A ``transformers`` GPT2Config / LlamaConfig for megalite model fields ``m``."""
    import transformers
    common = dict(vocab_size=vocab, tie_word_embeddings=not m["untie_embeddings_and_output_weights"],
                  initializer_range=m["init_method_std"], bos_token_id=eod, eos_token_id=eod,
                  architectures=[ARCHITECTURES[arch]], dtype=str(dtype).replace("torch.", ""))
    if arch == "gpt2":
        _require(m["num_query_groups"] == m["num_attention_heads"], "GPT-2 has no grouped-query attention")
        _require(not m["disable_bias_linear"], "GPT-2 has biases: drop --disable-bias-linear or export as Llama")
        return transformers.GPT2Config(
            n_layer=m["num_layers"], n_embd=m["hidden_size"], n_inner=m["ffn_hidden_size"],
            n_head=m["num_attention_heads"], n_positions=m["max_position_embeddings"],
            layer_norm_epsilon=m["norm_epsilon"], activation_function="gelu_new" if m.get("openai_gelu") else "gelu",
            attn_pdrop=m["attention_dropout"], resid_pdrop=m["hidden_dropout"], embd_pdrop=m["hidden_dropout"],
            **common)
    bias = not m["disable_bias_linear"]
    if arch == "mixtral":
        return transformers.MixtralConfig(
            num_hidden_layers=m["num_layers"], hidden_size=m["hidden_size"],
            intermediate_size=m["moe_ffn_hidden_size"] or m["ffn_hidden_size"],
            num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_query_groups"],
            head_dim=m["hidden_size"] // m["num_attention_heads"], max_position_embeddings=m["max_position_embeddings"],
            rms_norm_eps=m["norm_epsilon"], rope_theta=float(m["rotary_base"]), hidden_act="silu",
            num_local_experts=m["num_experts"], num_experts_per_tok=m["moe_router_topk"],
            router_aux_loss_coef=m.get("moe_aux_loss_coeff") or 0.0, sliding_window=None,
            attention_dropout=m["attention_dropout"], **common)
    return transformers.LlamaConfig(
        num_hidden_layers=m["num_layers"], hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_query_groups"],
        head_dim=m["hidden_size"] // m["num_attention_heads"], max_position_embeddings=m["max_position_embeddings"],
        rms_norm_eps=m["norm_epsilon"], rope_parameters={"rope_type": "default", "rope_theta": float(m["rotary_base"])},
        hidden_act="silu", attention_bias=bias, mlp_bias=bias, attention_dropout=m["attention_dropout"], **common)


def megalite_flags(m: dict) -> list[str]:
    """The pretrain_gpt.py model flags that rebuild this model (for --load ... --finetune)."""
    flags = ["--num-layers", m["num_layers"], "--hidden-size", m["hidden_size"], "--ffn-hidden-size",
             m["ffn_hidden_size"], "--num-attention-heads", m["num_attention_heads"]]
    if m["num_query_groups"] != m["num_attention_heads"]:
        flags += ["--group-query-attention", "--num-query-groups", m["num_query_groups"]]
    flags += ["--max-position-embeddings", m["max_position_embeddings"], "--position-embedding-type",
              m["position_embedding_type"], "--normalization", m["normalization"], "--norm-epsilon", m["norm_epsilon"]]
    if m["position_embedding_type"] == "rope":
        flags += ["--rotary-base", m["rotary_base"]]
    for name in ("swiglu", "openai_gelu", "disable_bias_linear", "untie_embeddings_and_output_weights"):
        if m.get(name):
            flags.append("--" + name.replace("_", "-"))
    if m.get("num_experts"):
        flags += ["--num-experts", m["num_experts"], "--moe-router-topk", m["moe_router_topk"],
                  "--moe-ffn-hidden-size", m["moe_ffn_hidden_size"] or m["ffn_hidden_size"]]
    return [str(f) for f in flags]


# -- tensors -------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Separate q ``[n*d, ...]``, k/v ``[g*d, ...]`` -> megalite's rows ``[q_1..q_k, k, v]`` per group."""
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)],
                     dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    d = qkv.shape[0] // (heads + 2 * groups)
    per_group = qkv.reshape(groups, (heads // groups + 2) * d, *qkv.shape[1:])
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def _layer_map(arch: str, m: dict) -> list[tuple[str, str, str]]:
    """``(megalite suffix, HF suffix, how)`` per layer tensor. how: copy; t (GPT-2 Conv1D, transposed);
    qkv / qkv_t (GPT-2 c_attn q|k|v blocks); qkv3 (Llama q/k/v_proj); gate_up (Llama [gate; up])."""
    bias = not m["disable_bias_linear"]
    if arch == "gpt2":
        return [("norm_1.weight", "ln_1.weight", "copy"), ("norm_1.bias", "ln_1.bias", "copy"),
                ("attention.qkv.weight", "attn.c_attn.weight", "qkv_t"),
                ("attention.qkv.bias", "attn.c_attn.bias", "qkv"),
                ("attention.proj.weight", "attn.c_proj.weight", "t"),
                ("attention.proj.bias", "attn.c_proj.bias", "copy"),
                ("norm_2.weight", "ln_2.weight", "copy"), ("norm_2.bias", "ln_2.bias", "copy"),
                ("mlp.fc1.weight", "mlp.c_fc.weight", "t"), ("mlp.fc1.bias", "mlp.c_fc.bias", "copy"),
                ("mlp.fc2.weight", "mlp.c_proj.weight", "t"), ("mlp.fc2.bias", "mlp.c_proj.bias", "copy")]
    rows = [("norm_1.weight", "input_layernorm.weight", "copy"),
            ("norm_2.weight", "post_attention_layernorm.weight", "copy")]
    for kind in ("weight",) + (("bias",) if bias else ()):
        rows += [(f"attention.qkv.{kind}", f"self_attn.{{q,k,v}}_proj.{kind}", "qkv3"),
                 (f"attention.proj.{kind}", f"self_attn.o_proj.{kind}", "copy")]
        if arch == "llama":
            rows += [(f"mlp.fc1.{kind}", f"mlp.{{gate,up}}_proj.{kind}", "gate_up"),
                     (f"mlp.fc2.{kind}", f"mlp.down_proj.{kind}", "copy")]
    if arch == "mixtral":
        rows.append(("mlp.router.weight", "block_sparse_moe.gate.weight", "copy"))
        for j in range(m["num_experts"]):
            rows += [(f"mlp.experts.{j}.fc1.weight", f"block_sparse_moe.experts.{j}.{{w1,w3}}.weight", "gate_up"),
                     (f"mlp.experts.{j}.fc2.weight", f"block_sparse_moe.experts.{j}.w2.weight", "copy")]
    return rows


def _pair(name: str) -> list[str]:
    """``a.{x,y}.b`` -> ``[a.x.b, a.y.b]``."""
    head, rest = name.split("{", 1)
    choices, tail = rest.split("}", 1)
    return [head + c + tail for c in choices.split(",")]


def _unfuse_experts(sd: dict) -> dict:
    """``transformers``' in-memory fused Mixtral experts (``mlp.experts.gate_up_proj [E, 2F, h]``,
    ``down_proj [E, h, F]``, router ``mlp.gate``) -> the per-expert names of its files."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            for j, block in enumerate(v):
                out[f"{p}.{j}.w1.weight"], out[f"{p}.{j}.w3.weight"] = block.chunk(2)
        elif k.endswith("mlp.experts.down_proj"):
            p = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            out.update({f"{p}.{j}.w2.weight": block for j, block in enumerate(v)})
        else:
            out[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = v
    return out


def _global_map(arch: str, m: dict) -> list[tuple[str, str]]:
    untied = m["untie_embeddings_and_output_weights"]
    if arch == "gpt2":
        rows = [("word_embeddings.weight", "transformer.wte.weight"),
                ("position_embeddings.weight", "transformer.wpe.weight"),
                ("final_norm.weight", "transformer.ln_f.weight"), ("final_norm.bias", "transformer.ln_f.bias")]
    else:
        rows = [("word_embeddings.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight")]
    return rows + ([("output_layer.weight", "lm_head.weight")] if untied else [])


def _layer_prefix(arch: str) -> str:
    return "transformer.h" if arch == "gpt2" else "model.layers"


def hf_to_megalite(arch: str, sd: dict, m: dict) -> dict[str, torch.Tensor]:
    """Full megalite tensors from an HF state dict (names with or without the base-model prefix)."""
    base = "transformer." if arch == "gpt2" else "model."
    sd = {(k if k.startswith((base, "lm_head.")) else base + k): v for k, v in sd.items()}
    if arch == "mixtral":
        sd = _unfuse_experts(sd)
    used: set[str] = set()

    def get(name):
        if name not in sd:
            raise ConversionError(f"Hugging Face checkpoint has no tensor {name!r}")
        used.add(name)
        return sd[name]

    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    full = {ours: get(theirs) for ours, theirs in _global_map(arch, m)}
    for i in range(m["num_layers"]):
        p = f"{_layer_prefix(arch)}.{i}."
        for ours, theirs, how in _layer_map(arch, m):
            if how == "qkv3":
                t = fuse_qkv(*(get(p + name) for name in _pair(theirs)), heads, groups)
            elif how == "gate_up":
                t = torch.cat([get(p + name) for name in _pair(theirs)])
            else:
                t = get(p + theirs)
                t = t.t() if how in ("t", "qkv_t") else t
                if how in ("qkv", "qkv_t"):  # GPT-2: q|k|v blocks of the output columns
                    t = fuse_qkv(*t.chunk(3, dim=0), heads, groups)
            full[f"layers.{i}.{ours}"] = t.contiguous()
    left = [k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if not m["untie_embeddings_and_output_weights"] and "lm_head.weight" in left:
        if not torch.equal(sd["lm_head.weight"], full["word_embeddings.weight"]):
            raise ConversionError("tie_word_embeddings is set but lm_head.weight differs from the embeddings")
        left.remove("lm_head.weight")
    if left:
        raise ConversionError(f"Hugging Face tensors with no megalite counterpart: {sorted(left)[:8]}")
    return {k: v.contiguous() for k, v in full.items()}


def megalite_to_hf(arch: str, full: dict, m: dict) -> dict[str, torch.Tensor]:
    """HF state dict (tied GPT-2 / Llama: no lm_head.weight) from full megalite tensors."""
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    unused = set(full)

    def get(name):
        if name not in full:
            raise ConversionError(f"megalite checkpoint has no tensor {name!r}")
        unused.discard(name)
        return full[name]

    sd = {theirs: get(ours) for ours, theirs in _global_map(arch, m)}
    for i in range(m["num_layers"]):
        p = f"{_layer_prefix(arch)}.{i}."
        for ours, theirs, how in _layer_map(arch, m):
            t = get(f"layers.{i}.{ours}")
            if how == "qkv3":
                for name, part in zip(_pair(theirs), split_qkv(t, heads, groups)):
                    sd[p + name] = part
            elif how == "gate_up":
                for name, part in zip(_pair(theirs), t.chunk(2, dim=0)):
                    sd[p + name] = part
            else:
                if how in ("qkv", "qkv_t"):
                    t = torch.cat(split_qkv(t, heads, groups))
                sd[p + theirs] = t.t() if how in ("t", "qkv_t") else t
    if unused:
        raise ConversionError(f"megalite tensors with no Hugging Face counterpart: {sorted(unused)[:8]}")
    return {k: v.contiguous().clone() for k, v in sd.items()}
