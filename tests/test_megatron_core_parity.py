"""Parity with megatron-core (a test dependency, in setup.py's ``test`` extra): process-group layouts
and GPTModel logits.

* Rank layouts: ``megalite.parallel_state.rank_groups`` returns, for every (world, tp, pp, cp) with
  world <= 64, the groups megatron-core's ``RankGenerator`` (order ``tp-cp-ep-dp-pp``) builds in
  ``initialize_model_parallel``, including the embedding / position-embedding groups it derives
  from each pipeline group; ``coordinates`` gives each rank's place in those groups. Pure
  functions, checked in this process (no megatron-core state is initialised here).
* GPTModel: megalite's GPTModel and megatron-core's (local layer spec, unfused torch paths, CPU
  init, dropout 0) with the same weights give the same logits and per-token loss, for a GPT-2
  style and a Llama-style config, at TP1 and at TP2 (2 gloo ranks). megatron-core's
  model-parallel state is global, so these run in processes of ``distributed_helper`` only;
  ``megatron_shims`` makes its forward pass run on a CPU-only torch.
"""
from __future__ import annotations

import re
import zlib

import pytest
import torch

from distributed_helper import run_distributed

# megatron-core's import notes that the optional CUDA kernels (apex, Transformer Engine) are absent.
pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")


def _import_megatron_core():
    try:
        import megatron.core  # noqa: F401
        missing = None
    except ImportError as e:
        missing = e
    if missing is not None:
        pytest.fail(f"megatron-core is not importable ({missing}); it is a test dependency of megalite: "
                    "pip install -e '.[test]'", pytrace=False)


# -- rank layouts ------------------------------------------------------------------------------
def _layouts(max_world: int):
    for world in range(1, max_world + 1):
        for tp in range(1, world + 1):
            for pp in range(1, world // tp + 1):
                for cp in range(1, world // (tp * pp) + 1):
                    if world % (tp * pp * cp) == 0:
                        yield world, tp, pp, cp


DENSE_GROUPS = ("tp", "pp", "dp", "cp", "dp_cp", "mp", "embedding", "position_embedding")


def _canonical(groups) -> list[list[int]]:
    return sorted(sorted(g) for g in groups)


def megatron_groups(world: int, tp: int, pp: int, cp: int) -> dict[str, list[list[int]]]:
    """The groups megatron-core's initialize_model_parallel builds for this layout (EP = 1),
    under megalite's names; pp groups stay in pipeline order (first stage first)."""
    from megatron.core.parallel_state import (RankGenerator, default_embedding_ranks,
                                              default_position_embedding_ranks)

    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    groups = {name: gen.get_ranks(token) for name, token in
              (("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("cp", "cp"), ("dp_cp", "dp-cp"), ("mp", "tp-pp"))}
    groups["embedding"] = [default_embedding_ranks(ranks) for ranks in groups["pp"]]
    groups["position_embedding"] = [default_position_embedding_ranks(ranks) for ranks in groups["pp"]]
    return groups


def test_rank_groups_match_megatron_core():
    _import_megatron_core()
    from megalite.parallel_state import coordinates, rank_groups

    count = 0
    for world, tp, pp, cp in _layouts(64):
        ours, theirs = rank_groups(world, tp=tp, pp=pp, cp=cp), megatron_groups(world, tp, pp, cp)
        layout = f"world {world} tp {tp} pp {pp} cp {cp}"
        for name in DENSE_GROUPS:
            assert ours[name] == _canonical(ours[name]), f"{layout}: {name} is not sorted"
            assert ours[name] == _canonical(theirs[name]), \
                f"{layout}: {name} {ours[name]} != megatron-core {_canonical(theirs[name])}"
        # A rank's coordinate is its index in megatron-core's group (pp in pipeline order).
        for dim in ("tp", "pp", "dp", "cp"):
            for group in theirs[dim]:
                for index, rank in enumerate(group):
                    assert coordinates(rank, world, tp=tp, pp=pp, cp=cp)[dim] == index, (layout, dim, rank)
        count += 1
    assert count > 1000  # every divisor layout up to 64 ranks


def test_design_example_layout():
    """DESIGN.md §3's example, from both libraries."""
    _import_megatron_core()
    from megalite.parallel_state import rank_groups

    expected = {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
                "dp": [[0, 2], [1, 3], [4, 6], [5, 7]], "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
                "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]], "position_embedding": [[0], [1], [2], [3]]}
    ours, theirs = rank_groups(8, tp=2, pp=2), megatron_groups(8, 2, 2, 1)
    for name, groups in expected.items():
        assert ours[name] == groups and _canonical(theirs[name]) == groups, name


# -- GPTModel logits ---------------------------------------------------------------------------
VOCAB, BATCH, SEQ = 100, 2, 16  # megalite pads the vocabulary to 128 (TP1) / 256 (TP2)
COMMON = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
          "--seq-length", str(SEQ), "--micro-batch-size", str(BATCH), "--mock-data"]
CONFIGS = {
    "gpt": [],  # learned positions, LayerNorm, GELU, biases, tied embeddings
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--disable-bias-linear", "--untie-embeddings-and-output-weights",
              "--group-query-attention", "--num-query-groups", "2"],
}
TOLERANCE = 1e-5

# megalite parameter name -> megatron-core GPTModel parameter name (a single pipeline stage, so
# layer indices agree). The fused tensors need no reordering: megatron-core's linear_qkv rows are
# [q_1..q_k, k, v] per key/value group (SelfAttention.get_query_key_value_tensors) and a SwiGLU
# linear_fc1 is [gate; up] on each TP rank (MLP.forward chunks it in two), as megalite's
# attention.qkv and mlp.fc1 (parts=2) are, shard for shard.
NAME_MAP = [
    (r"word_embeddings\.weight", r"embedding.word_embeddings.weight"),
    (r"position_embeddings\.weight", r"embedding.position_embeddings.weight"),
    (r"layers\.(\d+)\.norm_1\.(weight|bias)", r"decoder.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.attention\.qkv\.(weight|bias)", r"decoder.layers.\1.self_attention.linear_qkv.\2"),
    (r"layers\.(\d+)\.attention\.proj\.(weight|bias)", r"decoder.layers.\1.self_attention.linear_proj.\2"),
    (r"layers\.(\d+)\.norm_2\.(weight|bias)", r"decoder.layers.\1.pre_mlp_layernorm.\2"),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"decoder.layers.\1.mlp.linear_fc1.\2"),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"decoder.layers.\1.mlp.linear_fc2.\2"),
    (r"final_norm\.(weight|bias)", r"decoder.final_layernorm.\1"),
    (r"output_layer\.weight", r"output_layer.weight"),
]
# Vocab-parallel tables: megalite's are padded (rows past VOCAB, split over TP by the padded
# size), megatron-core's hold exactly VOCAB rows: they are resharded, not copied.
VOCAB_TABLES = ("word_embeddings.weight", "output_layer.weight")


def megatron_name(name: str) -> str | None:
    for pattern, replacement in NAME_MAP:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return None


def _gather_last_dim(x: torch.Tensor, pstate) -> torch.Tensor:
    """The full tensor from each TP rank's slice along the last dim."""
    import torch.distributed as dist
    if pstate.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(pstate.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=pstate.tp_group)
    return torch.cat(parts, dim=-1)


def _gather_first_dim(x: torch.Tensor, pstate) -> torch.Tensor:
    return _gather_last_dim(x.t(), pstate).t()


def _perturb(model: torch.nn.Module) -> None:
    """Move every parameter away from its init (biases 0, norms 1) by a name-seeded amount, equal
    on all TP ranks, so that a wrong mapping of any one of them changes the logits. The padded
    vocab rows become non-zero too: megalite's loss must still leave them out of the softmax."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _megatron_gpt(m, tp: int):
    """megatron-core's GPTModel for megalite's ModelConfig ``m``: local spec, torch (unfused) paths."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=not m.disable_bias_linear, gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu, init_method_std=m.init_method_std,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, params_dtype=torch.float32,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False)
    return GPTModel(config, get_gpt_layer_local_spec(normalization=m.normalization), vocab_size=VOCAB,
                    max_sequence_length=m.max_position_embeddings,
                    share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
                    position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base)


def _copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, pstate) -> list[str]:
    """Copy every megalite parameter into megatron-core's; returns the problems found (unmapped
    or unknown names, shape mismatches, megatron-core parameters left unset)."""
    targets = dict(theirs.named_parameters())
    problems, done = [], set()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            target = megatron_name(name)
            if target is None or target not in targets or target in done:
                problems.append(f"megalite {name} -> {target}: "
                                + ("set twice" if target in done else "not a megatron-core parameter"))
                continue
            src = p
            if name in VOCAB_TABLES:  # full real table, then megatron-core's shard of it
                src = _gather_first_dim(p, pstate)[:VOCAB].chunk(pstate.tp_size, dim=0)[pstate.tp_rank]
            if src.shape != targets[target].shape:
                problems.append(f"{name} {tuple(src.shape)} -> {target} {tuple(targets[target].shape)}")
                continue
            targets[target].copy_(src)
            done.add(target)
    problems += [f"megatron-core {name} is not set from any megalite parameter"
                 for name in targets if name not in done]
    return problems


def _compare(name: str, pstate) -> dict:
    from megalite.config import parse_args
    from megalite.model.gpt import GPTModel
    from megatron_shims import causal_mask

    tp = pstate.tp_size
    cfg = parse_args(COMMON + CONFIGS[name] + ["--tensor-model-parallel-size", str(tp)], world_size=tp)
    ours = GPTModel(cfg.model, pstate, vocab_size=VOCAB).eval()
    _perturb(ours)
    theirs = _megatron_gpt(cfg.model, tp).eval()
    problems = _copy_weights(ours, theirs, pstate)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = causal_mask(SEQ)
    with torch.no_grad():
        our_logits = _gather_last_dim(ours(tokens), pstate)  # [b, s, padded vocab]
        their_logits = _gather_last_dim(theirs(tokens, positions, mask), pstate)  # [b, s, VOCAB]
        our_loss, their_loss = ours(tokens, labels=labels), theirs(tokens, positions, mask, labels=labels)
    return {"problems": problems, "padded_vocab": our_logits.shape[-1], "shape": tuple(their_logits.shape),
            "logits_diff": (our_logits[..., :VOCAB] - their_logits).abs().max().item(),
            "logits_max": their_logits.abs().max().item(),
            "loss_diff": (our_loss - their_loss).abs().max().item(), "loss_mean": their_loss.mean().item()}


def _logits_worker(rank: int, world: int, names: list[str]) -> dict[int, dict]:
    """On 2 gloo ranks: compare every config at TP2, then (megatron-core's state rebuilt, DP = 2)
    at TP1 on rank 0. One set of processes for both sizes: starting them (and importing
    megatron-core there) is most of this test's time."""
    from megatron.core import parallel_state as mpu
    from megatron_shims import apply_cpu_shims

    from megalite.parallel_state import ParallelState

    apply_cpu_shims()
    results = {}
    for tp in (world, 1):
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            pstate = ParallelState.from_sizes(tp=tp)  # collective: every rank builds every group
            if tp > 1 or rank == 0:
                results[tp] = {name: _compare(name, pstate) for name in names}
        finally:
            mpu.destroy_model_parallel()
    return results


_RESULTS: dict = {}


def logits_results() -> dict[int, list[dict]]:
    """tp -> the results of every config on each rank that ran it. Computed once per session;
    a failure is kept too, so that the four tests do not each wait for a hanging run."""
    if "results" not in _RESULTS:
        try:
            by_rank = run_distributed(_logits_worker, 2, list(CONFIGS), timeout=180)
            _RESULTS["results"] = {tp: [r[tp] for r in by_rank if tp in r] for tp in (1, 2)}
        except Exception as e:  # noqa: BLE001 - reported by every test that needs the results
            _RESULTS["results"] = f"{type(e).__name__}: {e}"
    if isinstance(_RESULTS["results"], str):
        pytest.fail("the megatron-core comparison processes failed: " + _RESULTS["results"], pytrace=False)
    return _RESULTS["results"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpt_logits_match_megatron_core(name, tp):
    _import_megatron_core()
    for rank, results in enumerate(logits_results()[tp]):
        r = results[name]
        assert not r["problems"], "weight mapping: " + "; ".join(r["problems"])
        assert r["shape"] == (BATCH, SEQ, VOCAB) and r["padded_vocab"] == 128 * tp
        assert r["logits_max"] > 0.1  # not a degenerate comparison
        assert r["logits_diff"] <= TOLERANCE, f"rank {rank}: logits differ by {r['logits_diff']:.3e}"
        assert r["loss_diff"] <= TOLERANCE, f"rank {rank}: per-token loss differs by {r['loss_diff']:.3e}"


def test_no_megatron_core_state_in_the_pytest_process():
    """The comparisons above initialise megatron-core's global state in their own processes only."""
    _import_megatron_core()
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    assert not mpu.model_parallel_is_initialized() and not dist.is_initialized()


def test_expert_rank_groups_match_megatron_core():
    """The expert grid ("parallel folding"): ETP x EP x EDP x PP in order tp-cp-ep-dp-pp with
    cp = 1, as megatron-core's expert RankGenerator builds it, and its pipeline groups equal
    the dense ones; for every (world <= 24, tp, pp, cp, ep, etp) that divides."""
    _import_megatron_core()
    from megatron.core.parallel_state import RankGenerator

    from megalite.parallel_state import expert_coordinates, rank_groups

    count = 0
    for world, tp, pp, cp in _layouts(24):
        for ep in range(1, world + 1):
            for etp in range(1, world + 1):
                if world % (ep * etp * pp):
                    continue
                ours = rank_groups(world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
                gen = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
                layout = f"world {world} tp {tp} pp {pp} cp {cp} ep {ep} etp {etp}"
                for name, token in (("ep", "ep"), ("etp", "tp"), ("tp_ep", "tp-ep"), ("tp_ep_pp", "tp-ep-pp"),
                                    ("edp", "dp")):
                    assert ours[name] == _canonical(gen.get_ranks(token)), f"{layout}: {name}"
                assert _canonical(gen.get_ranks("pp")) == ours["pp"], f"{layout}: expert pp groups"
                for rank in range(world):
                    c = expert_coordinates(rank, world, pp=pp, ep=ep, etp=etp)
                    assert [g for g in ours["ep"] if rank in g][0].index(rank) == c["ep"], layout
                    assert [g for g in ours["edp"] if rank in g][0].index(rank) == c["edp"], layout
                count += 1
    assert count > 500
