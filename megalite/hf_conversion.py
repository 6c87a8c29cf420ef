"""Hugging Face GPT-2 / Llama <-> megalite: configs, tensor names and layouts, on CPU.

Everything here works on *full* tensors (the TP=1, unpadded layout of checkpoint_format.py)
keyed by megalite's global names; no training model is built. The name mapping is
:func:`_global_map` / :func:`_layer_map` (table in docs/checkpoints.md). Layout differences:
megalite fuses QKV rows per key/value group ``[q_1..q_k, k, v]`` (HF GPT-2: one Conv1D
``[h, 3h]`` with q|k|v column blocks; HF Llama: separate q/k/v_proj); SwiGLU fc1 is
``[gate; up]``; GPT-2's Conv1D weights are ``[in, out]`` (transposed). RoPE is the
non-interleaved ``rotate_half`` form in both megalite and HF Llama, so q/k rows need no
permutation. GPT-2's ``gelu_new`` is megalite's ``--openai-gelu`` (tanh GELU).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types

import torch

from .checkpoint_format import assemble, save_file, shard_for, verify_file
from .checkpointing import TRACKER, iteration_dir, read_tracker
from .config import Config, ModelConfig
from .tensor_parallel import pad_vocab_size

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# HF tensors that are buffers of older checkpoints, not weights: dropped on the way in.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class ConversionError(ValueError):
    """A config or checkpoint that cannot be converted (one message naming the field)."""


# -- configs -------------------------------------------------------------------------------
def detect_hf_arch(hf: dict) -> str:
    kind = hf.get("model_type") or ""
    arches = " ".join(hf.get("architectures") or [])
    for arch, cls in ARCHITECTURES.items():
        if kind == arch or cls in arches:
            return arch
    raise ConversionError(f"unsupported Hugging Face model_type {kind!r} ({arches or 'no architectures'}): "
                          "only GPT-2 (gpt2) and Llama (llama) are supported")


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
    else:
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
    return arch, fields, hf["vocab_size"]


def detect_megalite_arch(m: dict) -> str:
    """gpt2 for LayerNorm + learned positions + GELU, llama for RMSNorm + RoPE + SwiGLU."""
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
                 (f"attention.proj.{kind}", f"self_attn.o_proj.{kind}", "copy"),
                 (f"mlp.fc1.{kind}", f"mlp.{{gate,up}}_proj.{kind}", "gate_up"),
                 (f"mlp.fc2.{kind}", f"mlp.down_proj.{kind}", "copy")]
    return rows


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
                t = fuse_qkv(*(get(p + theirs.replace("{q,k,v}", x)) for x in "qkv"), heads, groups)
            elif how == "gate_up":
                t = torch.cat([get(p + theirs.replace("{gate,up}", x)) for x in ("gate", "up")])
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
                for x, part in zip("qkv", split_qkv(t, heads, groups)):
                    sd[p + theirs.replace("{q,k,v}", x)] = part
            elif how == "gate_up":
                for x, part in zip(("gate", "up"), t.chunk(2, dim=0)):
                    sd[p + theirs.replace("{gate,up}", x)] = part
            else:
                if how in ("qkv", "qkv_t"):
                    t = torch.cat(split_qkv(t, heads, groups))
                sd[p + theirs] = t.t() if how in ("t", "qkv_t") else t
    if unused:
        raise ConversionError(f"megalite tensors with no Hugging Face counterpart: {sorted(unused)[:8]}")
    return {k: v.contiguous().clone() for k, v in sd.items()}


# -- megalite checkpoints --------------------------------------------------------------------
def shard_layout(name: str, m: dict, vocab: int) -> dict:
    """How a full tensor is split over TP ranks, from its global name (as the layers set it):
    column-parallel (qkv, fc1: dim 0; fc1 as [gate; up] parts with SwiGLU), row-parallel
    (proj, fc2 weights: dim 1), vocab-parallel embeddings (dim 0, ``real_rows`` = vocab),
    everything else (norms, row-parallel biases, position embeddings) replicated."""
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if name in ("word_embeddings.weight", "output_layer.weight"):
        return {"partition_dim": 0, "parts": 1, "real_rows": vocab}
    if leaf in ("attention.qkv.weight", "attention.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias"):
        return {"partition_dim": 0, "parts": 2 if m["swiglu"] and leaf.startswith("mlp") else 1, "real_rows": None}
    if leaf in ("attention.proj.weight", "mlp.fc2.weight"):
        return {"partition_dim": 1, "parts": 1, "real_rows": None}
    return {"partition_dim": None, "parts": 1, "real_rows": None}


def stage_names(names, m: dict, pp: int, pp_rank: int) -> list[str]:
    """Global names a pipeline stage holds (the last stage of a tied model: the embedding copy)."""
    from .model import stage_layer_ranges
    (start, end), = stage_layer_ranges(m["num_layers"], pp, pp_rank)
    first, last, tied = pp_rank == 0, pp_rank == pp - 1, not m["untie_embeddings_and_output_weights"]
    out = []
    for name in names:
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None:
            keep = start <= int(layer) < end
        elif name == "word_embeddings.weight":
            keep = first or (last and tied)
        elif name == "position_embeddings.weight":
            keep = first
        else:  # final_norm, output_layer
            keep = last
        if keep:
            out.append(name)
    return out


def save_megalite_checkpoint(full: dict, m: dict, vocab: int, root: str, tp: int = 1, pp: int = 1,
                             iteration: int = 0, data: dict | None = None, source: str = "",
                             make_vocab_size_divisible_by: int = 128) -> str:
    """Write ``full`` as a megalite checkpoint of layout TP x PP (no optimizer, no RNG states),
    atomically (temp dir, fsync, rename, tracker last) as checkpointing.save_checkpoint does."""
    from .optimizer.lr_scheduler import LRScheduler
    model_cfg = ModelConfig(**{**dataclasses.asdict(ModelConfig()), **m, "make_vocab_size_divisible_by":
                               make_vocab_size_divisible_by})
    cfg = Config(model=model_cfg, world_size=tp * pp)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    padded = pad_vocab_size(vocab, make_vocab_size_divisible_by, tp)
    final, tmp = iteration_dir(root, iteration), os.path.join(root, f".iter_{iteration:07d}.tmp")
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists: convert into an empty --save directory")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest = {}
    for pp_rank in range(pp):
        names = stage_names(full, m, pp, pp_rank)
        for tp_rank in range(tp):
            items = {}
            for name in names:
                meta = shard_layout(name, m, vocab)
                sharded = meta["partition_dim"] is not None and tp > 1
                rows = (padded // tp if sharded else padded) if meta["real_rows"] else None
                fake = types.SimpleNamespace(tensor_model_parallel=sharded, partition_dim=meta["partition_dim"],
                                             parts=meta["parts"], real_rows=meta["real_rows"],
                                             shape=(rows,) + tuple(full[name].shape[1:]))
                items[name] = {"tensor": shard_for(full[name].float(), fake, tp_rank, tp).contiguous().clone(),
                               "partition_dim": meta["partition_dim"] if sharded else None, "parts": meta["parts"],
                               "tp_rank": tp_rank, "tp_size": tp, "real_rows": meta["real_rows"]}
            fname = f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"
            manifest[fname] = save_file(items, os.path.join(tmp, fname))
    t = cfg.training
    scheduler = LRScheduler(t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters, t.lr_decay_style)
    common = {"iteration": iteration, "consumed_samples": 0, "consumed_valid_samples": 0,
              "scheduler": scheduler.state_dict(), "scaler": None, "adam_step": 0, "skipped_iterations": 0,
              "config": dataclasses.asdict(cfg), "converted_from": source,
              "layout": {"tp": tp, "pp": pp, "dp": 1, "cp": 1, "world": tp * pp, "chunks": 1,
                         "distributed_optimizer": False}}
    manifest["common.pt"] = save_file(common, os.path.join(tmp, "common.pt"))
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    from .checkpoint_format import fsync_dir
    from .checkpointing import _write_tracker
    fsync_dir(tmp)
    os.rename(tmp, final)
    _write_tracker(root, iteration)
    return final


def read_megalite_checkpoint(root: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(full tensors by global name, common.pt)`` of the latest checkpoint under ``root``,
    whatever its TP/PP layout; every file is verified against the manifest first."""
    it = read_tracker(root)
    if it is None:
        raise FileNotFoundError(f"no megalite checkpoint in {root}: {os.path.join(root, TRACKER)} is missing")
    directory = iteration_dir(root, it)
    manifest = json.load(open(os.path.join(directory, "manifest.json")))

    def load(name):
        verify_file(os.path.join(directory, name), manifest[name])
        return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=False)

    common = load("common.pt")
    swiglu = common["config"]["model"].get("swiglu", False)
    pieces: dict[str, list[dict]] = {}
    for fname in sorted(k for k in manifest if k.startswith("model_")):
        for name, item in load(fname).items():
            item = {k: item[k] for k in ("tensor", "partition_dim", "parts", "tp_rank", "tp_size", "real_rows")}
            if swiglu and name.endswith("mlp.fc1.bias"):  # saved as parts=1 by ColumnParallelLinear, yet
                item["parts"] = 2                          # each TP rank holds [gate_r; up_r] like the weight
            pieces.setdefault(name, []).append(item)
    return {name: assemble(items) for name, items in pieces.items()}, common


def model_config_of(common: dict, **overrides) -> ModelConfig:
    """The ModelConfig saved in a checkpoint's common.pt (fields it lacks keep their defaults)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {k: v for k, v in common["config"]["model"].items() if k in known}
    return ModelConfig(**{**saved, "use_flash_attn": False, "transformer_impl": "local",
                          "recompute_granularity": None, **overrides})


def load_full_into(chunks, full: dict, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy full tensors into model chunks of any TP size (checkpoint_format.shard_for)."""
    from .checkpoint_format import named_global_params
    for name, p in named_global_params(chunks):
        if name not in full:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        with torch.no_grad():
            p.copy_(shard_for(full[name], p, tp_rank, tp_size))


def build_reference_model(model_cfg: ModelConfig, vocab: int, full: dict):
    """A single-process fp32 GPTModel (eval mode) holding ``full``."""
    from .model.gpt import GPTModel
    from .parallel_state import single_process_state
    model = GPTModel(model_cfg, single_process_state(), vocab_size=vocab)
    load_full_into([model], full)
    return model.eval()
