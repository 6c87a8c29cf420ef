"""Llama-style model options (RoPE, RMSNorm, SwiGLU, no biases, untied output, GQA) and the
optional fused backends: parallel == serial (grads and weights), RoPE against an independent
reference, clear errors."""
import sys

import pytest
import torch

from equivalence import TINY, assert_equivalent, run_layout, serial

LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--group-query-attention", "--num-query-groups", "2"]


# -- Llama configuration: parallel == serial ---------------------------------------------
@pytest.mark.parametrize("layout,world", [
    (["--tensor-model-parallel-size", "2"], 2),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4),
])
def test_llama_matches_serial(layout, world):
    ref = serial(tuple(LLAMA))
    assert ref["loss"][-1] < ref["loss"][0]
    assert ref["loss"] != serial()["loss"]  # the options do change the model
    assert_equivalent(ref, run_layout(TINY + LLAMA + layout, world))


def test_gqa_two_groups_per_tp_rank_with_two_heads_per_group():
    """8 heads in 4 KV groups at TP2: each rank holds 2 groups of 2 query heads (the QKV rows of
    a rank are [q q k v q q k v]): a wrong row split would mix groups and change the grads."""
    extra = ("--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "4")
    ref = serial(extra)
    assert ref["params"]["layers.0.attention.qkv.weight"].shape == ((8 + 2 * 4) * 4, 32)
    assert_equivalent(ref, run_layout(TINY + list(extra) + ["--tensor-model-parallel-size", "2"], 2))


def test_gqa_one_group_serial_differs_from_mha_and_tp2_is_a_clear_error():
    from megalite.config import parse_args

    one = serial(("--group-query-attention", "--num-query-groups", "1"))
    assert one["loss"] != serial(())["loss"]
    assert one["loss"][-1] < one["loss"][0]
    # KV heads are split across TP ranks: 1 group cannot be split over 2 ranks.
    argv = TINY + ["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"]
    with pytest.raises(SystemExit):
        parse_args(argv, world_size=2)
    from megalite.config import Config, ModelConfig, ParallelConfig, validate
    cfg = Config(model=ModelConfig(group_query_attention=True, num_query_groups=1),
                 parallel=ParallelConfig(tensor_model_parallel_size=2), world_size=2)
    with pytest.raises(ValueError, match=r"--num-query-groups 1 .*divisible by --tensor-model-parallel-size 2"):
        validate(cfg)
    # A layer built without validation refuses too (instead of silently having 0 groups per rank).
    from megalite.model.transformer import Attention, ParallelContext
    from megalite.parallel_state import ParallelState
    with pytest.raises(ValueError, match="KV heads are split across TP ranks"):
        Attention(cfg.model, ParallelContext(ParallelState(tp_size=2), None))


def test_gqa_needs_num_query_groups_and_divisibility():
    from megalite.config import Config, ModelConfig, validate
    with pytest.raises(ValueError, match="--group-query-attention needs --num-query-groups"):
        validate(Config(model=ModelConfig(group_query_attention=True)))
    with pytest.raises(ValueError, match="--num-query-groups 3 must divide --num-attention-heads 4"):
        validate(Config(model=ModelConfig(group_query_attention=True, num_query_groups=3)))


def test_gqa_shares_keys_within_a_group():
    """With one KV group every head attends with the same K/V: equal to repeating them."""
    from megalite.config import ModelConfig, validate, Config
    from megalite.model.core_attention import sdpa_attention
    from megalite.model.transformer import Attention, ParallelContext
    from megalite.parallel_state import single_process_state

    cfg = Config(model=ModelConfig(hidden_size=32, num_attention_heads=4, group_query_attention=True,
                                   num_query_groups=2, seq_length=8))
    validate(cfg)
    ctx = ParallelContext(single_process_state(), None)
    attn = Attention(cfg.model, ctx)
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # [q1 q2 k v] per group
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 2, 4, 8), torch.randn(8, 2, 2, 8), torch.randn(8, 2, 2, 8)
    got = sdpa_attention(q, k, v, 0.0, ctx)
    ref = sdpa_attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), 0.0, ctx)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


# -- RoPE against an independent reference (Hugging Face Llama's rotate_half form) --------
def _hf_rope(x_bnsd: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, written out independently."""
    d = x_bnsd.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, s, d]

    def rotate_half(t):
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return torch.cat((-t2, t1), dim=-1)
    return x_bnsd * cos + rotate_half(x_bnsd) * sin


@pytest.mark.parametrize("base", [10000, 500000])
def test_rope_matches_hf_llama_reference(base):
    from megalite.model.transformer import apply_rotary, rotary_cos_sin

    torch.manual_seed(0)
    s, b, n, d = 12, 2, 3, 16
    x = torch.randn(s, b, n, d, dtype=torch.float64)
    positions = torch.arange(5, 5 + s)  # an offset, as on a context-parallel rank
    got = apply_rotary(x, *rotary_cos_sin(positions, d, base, torch.float64))
    ref = _hf_rope(x.permute(1, 2, 0, 3), positions, base).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # Rotation: norms kept, position 0 is the identity, and q.k depends on relative position only.
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
    zero = apply_rotary(x[:1], *rotary_cos_sin(torch.zeros(1), d, base, torch.float64))
    torch.testing.assert_close(zero, x[:1])
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def dot(i, j):
        qi = apply_rotary(q.view(1, 1, 1, d), *rotary_cos_sin(torch.tensor([i]), d, base, torch.float64))
        kj = apply_rotary(k.view(1, 1, 1, d), *rotary_cos_sin(torch.tensor([j]), d, base, torch.float64))
        return (qi * kj).sum()
    torch.testing.assert_close(dot(7, 3), dot(14, 10))
    assert not torch.allclose(dot(7, 3), dot(7, 4))


def test_rope_matches_transformers_if_installed():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from megalite.model.transformer import apply_rotary, rotary_cos_sin

    torch.manual_seed(1)
    s, d = 10, 8
    q, k = torch.randn(1, 2, s, d), torch.randn(1, 2, s, d)
    pos = torch.arange(s)
    cos, sin = rotary_cos_sin(pos, d, 10000, torch.float32)
    ref_q, ref_k = modeling.apply_rotary_pos_emb(q, k, cos[:, 0, 0][None], sin[:, 0, 0][None])
    for x, ref in ((q, ref_q), (k, ref_k)):
        got = apply_rotary(x.permute(2, 0, 1, 3), cos, sin).permute(1, 2, 0, 3)
        torch.testing.assert_close(got, ref)


def test_swiglu_default_ffn_size_and_fc1_blocks():
    """fc1 holds [gate; up]; each TP rank gets matching slices of both blocks."""
    from megalite.config import parse_args
    cfg = parse_args(TINY + ["--swiglu"])
    assert cfg.model.ffn_hidden_size == 64  # Megatron: int(4h * 2/3 / 64) * 64 for h = 32
    assert parse_args(TINY).model.ffn_hidden_size == 128
    assert parse_args(TINY + ["--swiglu", "--ffn-hidden-size", "96"]).model.ffn_hidden_size == 96


# -- optional backends: CPU fallbacks and clear messages ---------------------------------
def _hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import of it now raises ImportError


def test_backends_import_lazily_and_default_to_torch(monkeypatch):
    _hide(monkeypatch, "flash_attn", "transformer_engine", "apex")
    from megalite.config import parse_args
    from megalite.model import backends
    from megalite.model.core_attention import core_attention_fn, sdpa_attention

    cfg = parse_args(TINY)
    assert cfg.model.transformer_impl == "local" and not cfg.model.use_flash_attn
    assert backends.resolve(cfg.model, torch.device("cpu")) == backends.Backends("torch", "torch")
    assert core_attention_fn(cfg.model, torch.device("cpu")) is sdpa_attention
    assert backends.norm_class(cfg.model, torch.device("cpu")) is torch.nn.LayerNorm


@pytest.mark.parametrize("flags,package,flag", [
    (["--use-flash-attn"], "flash-attn", "--use-flash-attn"),
    (["--transformer-impl", "transformer_engine"], "transformer-engine", "--transformer-impl transformer_engine"),
])
def test_missing_backend_is_one_clear_message(monkeypatch, capsys, flags, package, flag):
    """pretrain_gpt.py checks the optional packages right after parsing the flags."""
    _hide(monkeypatch, "flash_attn", "transformer_engine")
    import pretrain_gpt
    from megalite.model import backends

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        pretrain_gpt.main(TINY + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and f"pip install {package}" in err[0]
    assert "Traceback" not in err[0]
    with pytest.raises(backends.BackendUnavailable, match=f"pip install {package}"):
        backends.require("flash_attn" if "flash" in package else "transformer_engine")


def test_backend_on_cpu_is_a_clear_error_even_when_installed(monkeypatch):
    from megalite.config import ModelConfig
    from megalite.model import backends

    monkeypatch.setattr(backends, "is_installed", lambda module: True)
    cfg = ModelConfig(use_flash_attn=True)
    with pytest.raises(backends.BackendUnavailable, match="--use-flash-attn needs a CUDA device"):
        backends.resolve(cfg, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.missing_backends(cfg) == [
        "--use-flash-attn needs a CUDA device; this run is on CPU (drop --use-flash-attn)"]


def test_flash_attention_falls_back_to_sdpa_for_fp32_cpu_tensors():
    from megalite.model.core_attention import flash_attention, sdpa_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    torch.testing.assert_close(flash_attention(q, k, v, 0.0, None), sdpa_attention(q, k, v, 0.0, None))


def test_apex_is_auto_detected_only_with_cuda(monkeypatch):
    from megalite.config import ModelConfig
    from megalite.model import backends

    built = {"apex", backends.APEX_NORM_EXT}
    monkeypatch.setattr(backends, "is_installed", lambda module: module in built)
    assert backends.resolve(ModelConfig(), torch.device("cpu")) == backends.Backends("torch", "torch")
    assert backends.resolve(ModelConfig(), torch.device("cuda", 0)) == backends.Backends("torch", "apex")
    te = ModelConfig(transformer_impl="transformer_engine")
    with pytest.raises(backends.BackendUnavailable, match="pip install transformer-engine"):
        backends.resolve(te, torch.device("cuda", 0))
    built = {"apex"}  # python-only apex build: no fused kernels, so not used
    assert backends.resolve(ModelConfig(), torch.device("cuda", 0)) == backends.Backends("torch", "torch")


# -- GPU paths (skipped without CUDA) ------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_flash_attention_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    from megalite.model.core_attention import flash_attention, sdpa_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 2, n, 64, device="cuda", dtype=torch.bfloat16) for n in (8, 2, 2))
    torch.testing.assert_close(flash_attention(q, k, v, 0.0, None), sdpa_attention(q, k, v, 0.0, None),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_transformer_engine_norm_matches_torch_on_gpu():
    pytest.importorskip("transformer_engine")
    from megalite.config import ModelConfig
    from megalite.model import backends

    cfg = ModelConfig(hidden_size=64, normalization="RMSNorm", transformer_impl="transformer_engine")
    te_norm = backends.norm_class(cfg, torch.device("cuda"))(64, eps=1e-5).cuda()
    ref = torch.nn.RMSNorm(64, eps=1e-5).cuda()
    x = torch.randn(16, 2, 64, device="cuda")
    torch.testing.assert_close(te_norm(x), ref(x), rtol=1e-4, atol=1e-4)
