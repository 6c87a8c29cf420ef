"""The megatron-core side of tests/test_megatron_checkpoints.py (spawned gloo processes only):
megatron-core GPTModels built on CPU, their reference logits, the Megatron checkpoints they save
(megatron-core's own torch_dist writer; legacy ``model_optim_rng.pt`` files as Megatron-LM's
``generate_state_dict`` writes them) and the logits of the checkpoints megalite wrote. The test
module's docstring says what is run and compared; the model configs and tokens live here so that
both sides share them.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import zlib
from unittest import mock

import torch

VOCAB, PADDED, DIVISIBLE, BATCH, SEQ, ITERATION = 100, 128, 64, 2, 16, 7
TOLERANCE = 1e-5
COMMON = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
          "--max-position-embeddings", "32", "--mock-data", "--vocab-size", str(VOCAB)]
CONFIGS = {
    "gpt": ["--ffn-hidden-size", "96"],
    "llama": ["--ffn-hidden-size", "64", "--position-embedding-type", "rope", "--rotary-base", "1000",
              "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"],
}
# megatron-core's local spec keeps the norms apart; Transformer Engine fuses them into the next linear
# layer, and the local spec's sharded_state_dict_keys_map says how (gpt_layer_specs.py).
TE_KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def model_config(name: str) -> dict:
    from megalite.config import parse_args
    return dataclasses.asdict(parse_args(COMMON + CONFIGS[name]).model)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))



# -- megatron-core side (spawned processes only) -------------------------------------------
def _megatron_args(m: dict, tp: int, pp: int):
    """The argparse.Namespace Megatron-LM would save for this model (Megatron flag names), with
    values of megatron-core classes in it as a real run has (an enum, a dtype)."""
    from megatron.core.transformer.enums import AttnBackend
    rope = m["position_embedding_type"] == "rope"
    return argparse.Namespace(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
        num_attention_heads=m["num_attention_heads"], kv_channels=m["hidden_size"] // m["num_attention_heads"],
        group_query_attention=m["group_query_attention"],
        num_query_groups=m["num_query_groups"] if m["group_query_attention"] else 1,  # Megatron-LM's default
        seq_length=SEQ, max_position_embeddings=m["max_position_embeddings"],
        position_embedding_type=m["position_embedding_type"], rotary_base=m["rotary_base"], rotary_percent=1.0,
        rotary_interleaved=False, normalization=m["normalization"], norm_epsilon=m["norm_epsilon"],
        swiglu=m["swiglu"], openai_gelu=False, squared_relu=False, add_bias_linear=not m["disable_bias_linear"],
        add_qkv_bias=False, qk_layernorm=False, apply_layernorm_1p=False, num_experts=None,
        untie_embeddings_and_output_weights=m["untie_embeddings_and_output_weights"], init_method_std=0.02,
        hidden_dropout=0.0, attention_dropout=0.0, tokenizer_type="NullTokenizer", vocab_size=VOCAB - 1,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=DIVISIBLE, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None, params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, transformer_impl="local", ckpt_format="torch_dist",
        data_path=None, save="/tmp/megatron", load=None)


def _megatron_gpt(m: dict, tp: int, pp: int = 1, vpp: int | None = None, vp_stage: int | None = None):
    import torch.nn.functional as F
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
        normalization=m["normalization"], layernorm_epsilon=m["norm_epsilon"],
        add_bias_linear=not m["disable_bias_linear"], gated_linear_unit=m["swiglu"],
        activation_func=F.silu if m["swiglu"] else F.gelu, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        virtual_pipeline_model_parallel_size=vpp,
        use_cpu_initialization=True, params_dtype=torch.float32, bias_dropout_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False)
    return GPTModel(config, get_gpt_layer_local_spec(normalization=m["normalization"]), vocab_size=PADDED,
                    max_sequence_length=m["max_position_embeddings"],
                    pre_process=mpu.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
                    post_process=mpu.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
                    vp_stage=vp_stage,
                    share_embeddings_and_output_weights=not m["untie_embeddings_and_output_weights"],
                    position_embedding_type=m["position_embedding_type"], rotary_base=m["rotary_base"]).eval()


def _perturb(model, tp_rank: int) -> None:
    """Move every weight off its init by a name-seeded amount (TP shards: seeded per rank too), so a
    mis-mapped tensor (or a swapped shard, padded vocabulary row included) changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            sharded = getattr(p, "tensor_model_parallel", False)
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (7919 * tp_rank if sharded else 0))
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron_shims import causal_mask
    ids = tokens()
    out = model(ids, torch.arange(SEQ).expand(BATCH, SEQ), causal_mask(SEQ))
    parts = [torch.empty_like(out) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :VOCAB]


def _legacy_state(models: list, args, transformer_engine: bool) -> dict:
    """What Megatron-LM's generate_state_dict writes per mp_rank (model chunks, args, version, RNG...)."""
    import random

    import numpy as np
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "rng_state": [rng],
             "opt_param_scheduler": {"num_steps": 56}, "num_floating_point_operations_so_far": 0}
    for i, model in enumerate(models):
        state["model" if len(models) == 1 else f"model{i}"] = _model_state(model, transformer_engine)
    return state


def _model_state(model, transformer_engine: bool) -> dict:
    sd = model.state_dict_for_save_checkpoint()
    if transformer_engine:
        renamed = {}
        for key, value in sd.items():
            for local, te in TE_KEYS_MAP.items():
                key = key.replace("." + local, "." + te)
            renamed[key] = io.BytesIO(b"te-extra-state") if key.endswith("_extra_state") else value
        sd = renamed
    return sd


def _save_megatron(model, args, root: str, fmt: str, rank: int, tp_rank: int, pp_rank: int, pp: int,
                   metadata: dict | None = None, transformer_engine: bool = False) -> None:
    """``model``: a GPTModel, or (legacy format) the list of a rank's virtual-stage chunks."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state as mpu
    from megatron_shims import cpu_dist_checkpointing
    directory = os.path.join(root, f"iter_{ITERATION:07d}")
    if fmt == "torch_dist":
        os.makedirs(directory, exist_ok=True)
        meta = {**(metadata or {}), "dp_cp_group": mpu.get_data_parallel_group(with_context_parallel=True)}
        state = {"model": model.sharded_state_dict(metadata=meta), "args": args, "checkpoint_version": 3.0,
                 "iteration": ITERATION}
        with cpu_dist_checkpointing():
            dist_checkpointing.save(state, directory)
    else:
        rank_dir = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
        os.makedirs(os.path.join(directory, rank_dir), exist_ok=True)
        torch.save(_legacy_state(model if isinstance(model, list) else [model], args, transformer_engine),
                   os.path.join(directory, rank_dir, "model_optim_rng.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))


def _load_converted(m: dict, path: str, fmt: str, tp_rank: int):
    """A fresh megatron-core GPTModel (TP2) loaded from a checkpoint megalite wrote."""
    from megatron.core import dist_checkpointing
    from megatron_shims import cpu_dist_checkpointing
    model = _megatron_gpt(m, tp=2)
    directory = os.path.join(path, f"iter_{ITERATION:07d}")
    if fmt == "torch_dist":
        with cpu_dist_checkpointing():
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)["model"]
    else:
        state = torch.load(os.path.join(directory, f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt"),
                           weights_only=False)["model"]
    model.load_state_dict(state, strict=True)
    return model


def _save_stages(name: str, root: str, rank: int, vpp: int | None) -> None:
    """This rank's pipeline stage (TP1 x PP2, ``vpp`` chunks) loaded from the stacked torch_dist
    checkpoint by megatron-core, saved as legacy ``mp_rank_00_00P`` files (``legacy_pp2`` /
    ``legacy_vpp``)."""
    from megatron.core import dist_checkpointing
    from megatron_shims import cpu_dist_checkpointing
    m, out = model_config(name), os.path.join(root, name)
    # A tied model's stages all-reduce the embedding copies at construction, on the GPU: on a CPU
    # the tensors stay where they are.
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
        chunks = [_megatron_gpt(m, tp=1, pp=2, vpp=vpp, vp_stage=v if vpp else None) for v in range(vpp or 1)]
    # One load for all of a rank's chunks (as Megatron-LM's model0, model1...): a load validates
    # that the ranks together cover every layer.
    with cpu_dist_checkpointing():
        state = dist_checkpointing.load({f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)},
                                        f"{out}/dist_stacked/iter_{ITERATION:07d}")
    for v, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{v}"], strict=True)
    args = _megatron_args(m, tp=1, pp=2)
    args.virtual_pipeline_model_parallel_size = vpp
    _save_megatron(chunks, args, f"{out}/legacy_{'vpp' if vpp else 'pp2'}", "torch", rank, 0, rank, 2)


def megatron_worker(rank: int, world: int, root: str) -> dict:
    """Phase 1 (TP2): reference logits, Megatron checkpoints, converted-back checkpoints' logits.
    Phase 2 (TP1 x PP2, and x 2 virtual stages): legacy stage files from the stacked torch_dist
    checkpoint."""
    from megatron.core import dist_checkpointing, parallel_state as mpu
    from megatron_shims import apply_cpu_shims, cpu_dist_checkpointing
    apply_cpu_shims()
    results = {}
    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        for name in CONFIGS:
            m, out = model_config(name), os.path.join(root, name)
            model, llama = _megatron_gpt(m, tp=2), name == "llama"
            _perturb(model, rank)
            args = _megatron_args(m, tp=2, pp=1)
            results[name] = {"reference": _logits(model), "from_megalite": {}}
            _save_megatron(model, args, f"{out}/dist_stacked", "torch_dist", rank, rank, 0, 1)
            _save_megatron(model, args, f"{out}/legacy_tp2", "torch", rank, rank, 0, 1, transformer_engine=llama)
            if llama:
                _save_megatron(model, args, f"{out}/dist_per_layer", "torch_dist", rank, rank, 0, 1,
                               metadata={"singleton_local_shards": True})
            for fmt in ("torch", "torch_dist"):
                converted = _load_converted(m, f"{out}/to_megatron_{fmt}", fmt, rank)
                results[name]["from_megalite"][fmt] = _logits(converted)
    finally:
        mpu.destroy_model_parallel()
    for vpp in (None, 2):
        mpu.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                                      virtual_pipeline_model_parallel_size=vpp)
        try:
            for name in CONFIGS if vpp is None else ["llama"]:
                _save_stages(name, root, rank, vpp)
        finally:
            mpu.destroy_model_parallel()
    return results if rank == 0 else {}
