"""tools/convert_checkpoint.py: Megatron-LM checkpoints (legacy ``mp_rank_*`` and ``torch_dist``) <->
megalite, checked against megatron-core (a test dependency) on CPU.

One pair of gloo processes runs megatron-core (it keeps global state, so never in the pytest
process; that side is tests/megatron_checkpoint_worker.py) and, for a GPT-2-style model (learned positions, LayerNorm, GELU, biases, tied
embeddings) and a Llama-style one (RoPE, RMSNorm, SwiGLU, GQA, no biases, untied):

* builds its GPTModel at TP2 (local layer spec, randomised weights, a padded vocabulary of 128
  rows of which the NullTokenizer's 100 are real), computes reference logits, and saves it the
  way Megatron-LM does: ``torch_dist`` with megatron-core's own writer
  (``dist_checkpointing.save``, stacked layers; for Llama also per layer with
  ``singleton_local_shards``) and legacy ``mp_rank_0T/model_optim_rng.pt`` files holding
  ``{"args", "checkpoint_version": 3.0, "iteration", "model": state_dict_for_save_checkpoint(),
  "rng_state", ...}`` (megatron-core has no legacy writer; this is Megatron-LM's
  ``generate_state_dict``). The Llama legacy files use Transformer-Engine names, produced with
  the local spec's own ``sharded_state_dict_keys_map`` (TE itself does not run on CPU);
* re-loads the stacked torch_dist checkpoint at TP1 x PP2 (and Llama with 2 virtual stages) with
  megatron-core's loader and saves legacy ``mp_rank_00_00P`` files from those stages;
* loads the checkpoints megalite-to-megatron wrote (legacy TP2 and torch_dist) into fresh
  GPTModels (``load_state_dict(strict=True)`` / ``dist_checkpointing.load``) and computes logits.

The pytest process converts every Megatron checkpoint to megalite (TP2 x PP2, TP1) and compares
megalite's logits with megatron-core's, and compares megatron-core's logits of the converted-back
checkpoints with megalite's (max abs diff <= 1e-5).
"""
from __future__ import annotations

import argparse
import os
import pickle
import zlib

import pytest
import torch

from distributed_helper import run_distributed
from megatron_checkpoint_worker import CONFIGS, DIVISIBLE, ITERATION, PADDED, TOLERANCE, VOCAB, megatron_worker, \
    model_config, tokens

from megalite.checkpointing import convert as mc
from megalite.interop import megatron as mm
from megalite.interop.megatron import legacy as mio, torch_dist as md
from tools.convert_checkpoint import main as convert

pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")


# -- pytest side ---------------------------------------------------------------------------
def _megalite_full(name: str) -> dict[str, torch.Tensor]:
    """Random full tensors of a megalite model (every weight, norms and biases too, off its init)."""
    from megalite.model import named_global_parameters
    from megalite.model.gpt import GPTModel
    from megalite.parallel_state import single_process_state
    model = GPTModel(mc.model_config_of({"config": {"model": model_config(name)}}), single_process_state(),
                     vocab_size=VOCAB)
    gen, full = torch.Generator().manual_seed(zlib.crc32(name.encode())), {}
    for n, p in named_global_parameters([model]):
        t = p.detach()[:VOCAB] if n in ("word_embeddings.weight", "output_layer.weight") else p.detach()
        full[n] = t + 0.1 * torch.randn(t.shape, generator=gen)
    return full


@torch.no_grad()
def megalite_logits(path: str) -> torch.Tensor:
    """Logits of the (single-process, fp32) megalite model of the latest checkpoint under ``path``."""
    full, common = mc.read_megalite_checkpoint(path)
    model = mc.build_reference_model(mc.model_config_of(common), full["word_embeddings.weight"].shape[0], full)
    return model(tokens())[..., :VOCAB]


def _prepare_megalite_sources(root: str) -> None:
    """megalite checkpoints (TP1) and their megalite-to-megatron conversions, for the worker to load."""
    for name in CONFIGS:
        src = os.path.join(root, name, "megalite")
        mc.save_megalite_checkpoint(_megalite_full(name), model_config(name), VOCAB, src, iteration=ITERATION,
                                    data={"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB - 1})
        for fmt in ("torch", "torch_dist"):
            convert(["--direction", "megalite-to-megatron", "--load", src, "--save",
                     os.path.join(root, name, f"to_megatron_{fmt}"), "--ckpt-format", fmt,
                     "--target-tensor-parallel-size", "2", "--transformer-impl", "local",
                     "--make-vocab-size-divisible-by", str(DIVISIBLE)])


_RESULTS: dict = {}


@pytest.fixture(scope="module")
def megatron(tmp_path_factory) -> dict:
    """``{"root": dir, "results": worker results}``, computed once; a failure is kept, so that every
    test needing it fails fast instead of re-running the processes."""
    if "value" not in _RESULTS:
        root = str(tmp_path_factory.mktemp("megatron"))
        try:
            import megatron.core  # noqa: F401
            _prepare_megalite_sources(root)
            _RESULTS["value"] = {"root": root,
                                 "results": run_distributed(megatron_worker, 2, root, timeout=240)[0]}
        except Exception as e:  # noqa: BLE001 - reported by every test that needs it
            _RESULTS["value"] = f"{type(e).__name__}: {e}"
    if isinstance(_RESULTS["value"], str):
        pytest.fail("the megatron-core processes failed: " + _RESULTS["value"], pytrace=False)
    return _RESULTS["value"]


MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "seq_length", "max_position_embeddings", "position_embedding_type", "rotary_base", "normalization",
               "norm_epsilon", "swiglu", "openai_gelu", "disable_bias_linear", "untie_embeddings_and_output_weights")
# name, source checkpoint, megalite target layout
FORWARD = [("gpt", "dist_stacked", (2, 2)), ("gpt", "legacy_tp2", (1, 1)), ("gpt", "legacy_pp2", (2, 2)),
           ("llama", "dist_stacked", (1, 2)), ("llama", "dist_per_layer", (2, 1)), ("llama", "legacy_tp2", (2, 2)),
           ("llama", "legacy_pp2", (2, 1)), ("llama", "legacy_vpp", (1, 4))]


@pytest.mark.parametrize("name,source,layout", FORWARD, ids=[f"{n}-{s}" for n, s, _ in FORWARD])
def test_megatron_to_megalite_gives_megatron_core_logits(megatron, tmp_path, name, source, layout):
    out = str(tmp_path / "megalite")
    result = convert(["--direction", "megatron-to-megalite", "--load", os.path.join(megatron["root"], name, source),
                      "--save", out, "--target-tensor-parallel-size", str(layout[0]),
                      "--target-pipeline-model-parallel-size", str(layout[1])])
    assert result["vocab"] == VOCAB  # the NullTokenizer's, not the 128 padded rows
    expected = model_config(name)  # the flags megatron-core's model was built from
    assert {k: result["model"][k] for k in MODEL_FLAGS} == {k: expected[k] for k in MODEL_FLAGS}
    _, common = mc.read_megalite_checkpoint(out)
    assert (common["iteration"], common["layout"]["tp"], common["layout"]["pp"]) == (ITERATION, *layout)
    reference = megatron["results"][name]["reference"]
    diff = (megalite_logits(out) - reference).abs().max().item()
    print(f"{name} {source} -> megalite TP{layout[0]} PP{layout[1]}: max abs logit diff {diff:.2e}")
    assert reference.abs().max() > 0.5 and diff <= TOLERANCE


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_megalite_to_megatron_loads_into_megatron_core(megatron, name, fmt):
    """megatron-core loads what megalite-to-megatron wrote (legacy: load_state_dict(strict=True) of
    each TP2 rank's file; torch_dist: dist_checkpointing.load at TP2) and gives megalite's logits."""
    expected = megalite_logits(os.path.join(megatron["root"], name, "megalite"))
    got = megatron["results"][name]["from_megalite"][fmt]
    diff = (got - expected).abs().max().item()
    print(f"megalite {name} -> Megatron {fmt} (TP2): max abs logit diff {diff:.2e}")
    assert expected.abs().max() > 0.5 and diff <= TOLERANCE


def _tensor_keys(directory: str) -> dict:
    metadata = md.read_metadata(directory)
    return {k: tuple(v.size) if md._kind(v) == "TensorStorageMetadata" else None
            for k, v in metadata.state_dict_metadata.items()}


def test_written_files_have_megatron_cores_keys_and_shapes(megatron, tmp_path):
    """megalite-to-megatron writes exactly the keys (``_extra_state`` included) and shapes that
    megatron-core writes: legacy at TP2 and TP1 x PP2 (stage files), torch_dist (DCP keys)."""
    root, it, pairs = megatron["root"], f"iter_{ITERATION:07d}", []
    for name in CONFIGS:
        pp2 = str(tmp_path / f"{name}_pp2")
        convert(["--direction", "megalite-to-megatron", "--load", os.path.join(root, name, "megalite"), "--save",
                 pp2, "--ckpt-format", "torch", "--target-pipeline-model-parallel-size", "2",
                 "--transformer-impl", "local", "--make-vocab-size-divisible-by", str(DIVISIBLE)])
        pairs += [(os.path.join(pp2, it, f"mp_rank_00_{r:03d}"),
                   os.path.join(root, name, "legacy_pp2", it, f"mp_rank_00_{r:03d}")) for r in (0, 1)]
    pairs += [(os.path.join(root, "gpt", "to_megatron_torch", it, f"mp_rank_{t:02d}"),
               os.path.join(root, "gpt", "legacy_tp2", it, f"mp_rank_{t:02d}")) for t in (0, 1)]
    for ours, theirs in pairs:
        ours, theirs = (md.safe_load(os.path.join(d, mio.CHECKPOINT_FILE)) for d in (ours, theirs))
        assert {k: getattr(v, "shape", None) for k, v in ours["model"].items()} == \
            {k: getattr(v, "shape", None) for k, v in theirs["model"].items()}
        for key in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size", "swiglu",
                    "normalization", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            assert getattr(ours["args"], key) == getattr(theirs["args"], key), key
        assert ours["checkpoint_version"] == theirs["checkpoint_version"] == 3.0
    for name in CONFIGS:
        assert _tensor_keys(os.path.join(root, name, "to_megatron_torch_dist", it)) == \
            _tensor_keys(os.path.join(root, name, "dist_stacked", it))


def test_round_trips_through_megalite_keep_every_tensor(megatron, tmp_path):
    """Megatron (legacy, Transformer-Engine names, TP2) -> megalite (TP2 x PP2) -> Megatron (legacy,
    TE names, TP1 x PP2 with 2 virtual stages: model0 / model1 per file) -> the same tensors; and
    torch_dist -> megalite -> torch_dist the same."""
    root = megatron["root"]
    for source, extra in (("legacy_tp2", ["--ckpt-format", "torch", "--target-pipeline-model-parallel-size", "2",
                                          "--target-num-layers-per-virtual-pipeline-stage", "1"]),
                          ("dist_stacked", ["--ckpt-format", "torch_dist"])):
        src, ours, back = (os.path.join(root, "llama", source), str(tmp_path / f"{source}_megalite"),
                           str(tmp_path / f"{source}_back"))
        convert(["--direction", "megatron-to-megalite", "--load", src, "--save", ours, *TP2PP2])
        convert(["--direction", "megalite-to-megatron", "--load", ours, "--save", back, *extra])
        before, after = mio.read_megatron_checkpoint(src), mio.read_megatron_checkpoint(back)
        assert after["iteration"] == ITERATION and after["format"] == before["format"]
        first = {mm.canonical_name(k): v for k, v in before["tensors"].items()}
        second = {mm.canonical_name(k): v for k, v in after["tensors"].items()}
        assert sorted(first) == sorted(second)
        for key, t in first.items():
            rows = VOCAB if key in mm.VOCAB_TABLES else None  # padding rows: Megatron's vs zeros
            assert torch.equal(t[:rows], second[key][:rows]), key
    vpp_file = md.safe_load(os.path.join(tmp_path, "legacy_tp2_back", f"iter_{ITERATION:07d}", "mp_rank_00_001",
                                         mio.CHECKPOINT_FILE))
    assert sorted(k for k in vpp_file if k.startswith("model")) == ["model0", "model1"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in vpp_file["model1"]
    assert vpp_file["args"].virtual_pipeline_model_parallel_size == 2


TP2PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-model-parallel-size", "2"]


def test_megatron_args_round_trip_and_unsupported_models_are_refused():
    for name in CONFIGS:
        m = model_config(name)
        args = argparse.Namespace(**mm.args_from_model_config(m, PADDED, 2, 1))
        back = mm.model_config_from_args(args)
        assert {k: back[k] for k in MODEL_FLAGS} == {k: m[k] for k in MODEL_FLAGS}
    base = mm.args_from_model_config(model_config("llama"), PADDED, 1, 1)
    for field, value, match in [("num_experts", 8, "MoE"), ("qk_layernorm", True, "qk-layernorm"),
                                ("rotary_percent", 0.5, "rotary-percent"), ("kv_channels", 16, "kv-channels"),
                                ("position_embedding_type", "mrope", "mrope"), ("add_qkv_bias", True, "add-qkv-bias"),
                                ("apply_layernorm_1p", True, "layernorm-1p"), ("squared_relu", True, "squared-relu")]:
        with pytest.raises(mm.ConversionError, match=match):
            mm.model_config_from_args(argparse.Namespace(**{**base, field: value}))


class _RunsCode:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_crafted_megatron_files_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    legacy = tmp_path / "legacy"
    os.makedirs(legacy / "iter_0000001" / "mp_rank_00")
    (legacy / "latest_checkpointed_iteration.txt").write_text("1")
    torch.save({"args": _RunsCode(os.system, f"touch {marker}"), "checkpoint_version": 3.0, "model": {}},
               legacy / "iter_0000001" / "mp_rank_00" / mio.CHECKPOINT_FILE)
    with pytest.raises(SystemExit, match="posix.system, outside the allow-list .* refusing to load it"):
        convert(["--direction", "megatron-to-megalite", "--load", str(legacy), "--save", str(tmp_path / "out")])
    dist = tmp_path / "dist"
    os.makedirs(dist)
    (dist / ".metadata").write_bytes(pickle.dumps(_RunsCode(eval, f"open({str(marker)!r}, 'w')"), protocol=2))
    with pytest.raises(ValueError, match=r"\.eval is not allowed in a checkpoint.s \.metadata"):
        md.read_metadata(str(dist))
    assert not marker.exists()
    # Classes of an allowed package are inert stand-ins: nothing is imported or called.
    path = tmp_path / "standin.pt"
    torch.save({"args": argparse.Namespace(num_layers=3), "obj": _RunsCode(torch.save, {}, str(marker))}, path)
    loaded = md.safe_load(str(path))
    assert loaded["args"].num_layers == 3 and isinstance(loaded["obj"], md.Opaque) and not marker.exists()
