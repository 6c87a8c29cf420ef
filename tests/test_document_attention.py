"""Document-masked attention's kernels and the choice between them (megalite/model/document_attention.py).

* Every path that runs on the CPU gives, outputs and q/k/v grads, the attention of each document
  alone (plain causal SDPA per document in float64, written here): the chunked path, the
  whole-mask fallback (also with a context-parallel mask: local queries against the gathered
  keys), and the varlen path through a fake ``varlen_attn`` of each torch release (2.10's
  ``is_causal``, 2.11's ``window_size``, 2.12/2.13's ``enable_gqa``; without it, GQA by
  expanding the key/value heads).
* FlexAttention: forward only on the CPU (torch refuses its backward there), with and without a
  CP mask; its hand-built block mask keeps exactly the allowed (query, key) pairs, and equals
  ``create_block_mask``'s where that is exact (no CP).
* The kernel chosen for each device / dtype / dropout / CP / torch signature, and the start-up line.
* GPU tier (``pytest -m gpu``; skipped without CUDA): varlen, flex and the whole mask on CUDA bf16
  against the fp32 reference, outputs and grads (flex backward included).
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

from megalite.model import document_attention as da
from megalite.model.context_parallel import gather_positions, local_positions
from megalite.model.document_mask import DocumentMask

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*:UserWarning")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _document_ids(b: int, s: int, seed: int) -> torch.Tensor:
    """``[b, s]`` ids of documents of every length (1 token up to most of the sample)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, s, generator=g) < 0.12
    starts[:, 0] = True
    starts[0, 1:s // 2] = False  # sample 0 begins with a long document
    starts[-1, s - 3:] = True    # and the last ends with one-token documents
    return starts.long().cumsum(dim=1) - 1


def _inputs(s, b, n, g, d, seed=0, device=CPU, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(s, b, n, d), (s, b, g, d), (s, b, g, d), (s, b, n * d)]
    return [torch.randn(*shape, generator=gen).to(device, dtype) for shape in shapes]


def reference(q, k, v, ids) -> torch.Tensor:
    """Each document of each sample alone through plain causal SDPA, in float64; ``[s, b, n*d]``."""
    s, b, n, d = q.shape
    q, k, v = (t.double() for t in (q, k, v))
    out = torch.zeros(s, b, n, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        for doc in ids[i].unique():
            rows = (ids[i] == doc).nonzero().flatten()
            qs, ks, vs = (t[rows, i].transpose(0, 1) for t in (q, k, v))  # [heads, len, d]
            ks, vs = (t.repeat_interleave(n // k.shape[2], dim=0) for t in (ks, vs))
            out[rows, i] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out.reshape(s, b, n * d)


def _run(fn, inputs, grad=True):
    """``fn(q, k, v)``'s output and, with ``grad``, the grads of q, k, v for the upstream grad."""
    q, k, v, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out = fn(*leaves)
    if not grad:
        return [out.detach()]
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_matches(got, want, rtol=1e-5, atol=1e-5):
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# -- fakes of torch's varlen_attn, one per release (signatures copied from the release wheels) --
CALLS: list[dict] = []


def _segments(query, key, value, cu, max_len, causal, gqa):
    """What varlen_attn computes: attention within each ``cu`` segment; GQA only if the release has it."""
    if key.shape[1] != query.shape[1] and not gqa:
        raise ValueError("this varlen_attn has no GQA: query and key heads differ")
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert end - start <= max_len
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(out)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    CALLS.append(dict(is_causal=is_causal, kv_heads=key.shape[1]))
    return _segments(query, key, value, cu_seq_q, max_q, is_causal, gqa=False)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    CALLS.append(dict(window_size=window_size, kv_heads=key.shape[1]))
    return _segments(query, key, value, cu_seq_q, max_q, window_size == (-1, 0), gqa=False)  # torch's test


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    CALLS.append(dict(window_size=window_size, enable_gqa=enable_gqa, kv_heads=key.shape[1]))
    return _segments(query, key, value, cu_seq_q, max_q, window_size == (-1, 0), gqa=enable_gqa)


RELEASES = {"2.10": varlen_2_10, "2.11": varlen_2_11, "2.12": varlen_2_12, "2.13": varlen_2_12}  # 2.14: 2.12's
SIGNATURES = {"2.10": da.VarlenSignature("is_causal", False), "2.11": da.VarlenSignature("window_size", False),
              "2.12": da.VarlenSignature("window_size", True), "2.13": da.VarlenSignature("window_size", True)}


def test_fakes_have_the_signature_of_the_installed_release():
    real = da.installed_varlen_attn()
    release = ".".join(torch.__version__.split(".")[:2])
    assert release not in RELEASES or real is not None
    if release in RELEASES:  # the fake of this release has exactly torch's parameters
        assert list(inspect.signature(real).parameters) == list(inspect.signature(RELEASES[release]).parameters)
        assert da.varlen_signature(real) == SIGNATURES[release]


# -- every CPU path against the reference --------------------------------------------------------
S, B, N, G, D = 40, 3, 4, 2, 8


@pytest.fixture(scope="module")
def case():
    ids = _document_ids(B, S, seed=1)
    inputs = _inputs(S, B, N, G, D)
    return ids, inputs, _run(lambda q, k, v: reference(q, k, v, ids), inputs)


def test_chunked_dense_and_dispatcher_equal_each_document_alone(case):
    ids, inputs, want = case
    mask = DocumentMask(ids)
    assert da.choose_kernel(inputs[0], 0.0, mask)[0] == "chunked"
    for fn in (lambda q, k, v: da.chunked_document_attention(q, k, v, mask, 0.0, chunk=7),
               lambda q, k, v: da.dense_document_attention(q, k, v, mask, 0.0),
               lambda q, k, v: da.document_attention(q, k, v, mask, 0.0)):
        _assert_matches(_run(fn, inputs), want)


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_varlen_path_calls_each_release_as_its_signature_asks(release, case, monkeypatch):
    """Causal by is_causal (2.10) or window_size=(-1, 0) (2.11+); GQA by enable_gqa (2.12+) or
    by expanding the key/value heads in megalite's order; outputs and grads as the reference."""
    ids, inputs, want = case
    monkeypatch.setattr(da, "installed_varlen_attn", lambda: RELEASES[release])
    signature = da.varlen_signature(da.installed_varlen_attn())
    assert signature == SIGNATURES[release]
    CALLS.clear()
    got = _run(lambda q, k, v: da.torch_varlen_attention(q, k, v, DocumentMask(ids)), inputs)
    _assert_matches(got, want)
    if release == "2.10":
        assert CALLS == [dict(is_causal=True, kv_heads=N)]
    elif signature.gqa:  # (a tuple: torch tests window_size == (-1, 0), which a list fails)
        assert CALLS == [dict(window_size=(-1, 0), enable_gqa=True, kv_heads=G)]
    else:
        assert CALLS == [dict(window_size=(-1, 0), kv_heads=N)]


def test_dense_fallback_with_a_context_parallel_mask(case):
    """CP rank 1 of 2: its queries (two chunks) against the keys of every rank in gathered order,
    masked by global positions; output rows and q/k/v grads as the reference's."""
    ids, (q, k, v, grad_out), _ = case
    local, gathered = local_positions(S, 1, 2), gather_positions(S // 2, 2)
    mask = DocumentMask(ids[:, local], ids[:, gathered], local, gathered)
    grad_local = _scatter(grad_out[local], local)
    want = _run(lambda q, k, v: _scatter(reference(q, k, v, ids)[local], local), (q, k, v, grad_local))
    assert da.choose_kernel(q, 0.0, mask)[0] == "dense"
    got = _run(lambda q, k, v: _scatter(da.document_attention(q[local], k[gathered], v[gathered], mask, 0.0),
                                        local), (q, k, v, grad_local))
    _assert_matches(got, want)


def _scatter(rows, index):
    """``rows`` put back at their sequence positions (zeros elsewhere)."""
    return torch.zeros(S, *rows.shape[1:], dtype=rows.dtype, device=rows.device).index_copy(0, index, rows)


# -- FlexAttention on the CPU: forward, and its block mask ----------------------------------------
def _cp_mask(ids, rank=1, cp=2):
    s = ids.shape[1]
    local, gathered = local_positions(s, rank, cp), gather_positions(s // cp, cp)
    return DocumentMask(ids[:, local], ids[:, gathered], local, gathered), local, gathered


def test_flex_forward_equals_each_document_alone(case):
    ids, (q, k, v, _), (want, *_) = case
    with torch.no_grad():
        got = da.flex_document_attention(q, k, v, DocumentMask(ids), block_size=16)  # 40 = 2.5 blocks
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        mask, local, gathered = _cp_mask(ids)
        got = da.flex_document_attention(q[local], k[gathered], v[gathered], mask, block_size=8)
        torch.testing.assert_close(got.double(), want[local], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no dropout"):
        da.flex_document_attention(q, k, v, DocumentMask(ids), dropout=0.1)


def _blocks(num, indices) -> torch.Tensor:
    """Flex's ``(num_blocks, indices)`` back to ``[b, nq, nk]`` bool."""
    out = torch.zeros(num.shape[0], *indices.shape[2:], dtype=torch.bool)
    for b in range(num.shape[0]):
        for qb in range(num.shape[2]):
            out[b, qb, indices[b, 0, qb, :num[b, 0, qb]].long()] = True
    return out


def _kept(block_mask, size):
    partial = _blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = _blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    expand = (lambda x: x.repeat_interleave(size, 1).repeat_interleave(size, 2))
    return partial, full, expand(partial), expand(full)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_flex_block_mask_keeps_exactly_the_allowed_pairs(cp):
    """Kernel view: full blocks everywhere allowed, partial blocks through mask_mod, nothing else.
    Without CP the blocks equal create_block_mask's (which evaluates the mask everywhere)."""
    from torch.nn.attention.flex_attention import create_block_mask

    size, s = 4, 48
    ids = _document_ids(2, s, seed=3)
    mask = _cp_mask(ids, rank=cp - 1, cp=cp)[0] if cp > 1 else DocumentMask(ids)
    block_mask = da.flex_block_mask(mask, size)
    s_q, s_k = mask.query_ids.shape[1], s
    partial, full, partial_el, full_el = _kept(block_mask, size)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(s_q), torch.arange(s_k), indexing="ij")
    allowed_by_mod = block_mask.mask_mod(b, torch.zeros_like(b), q, k)
    seen = full_el[:, :s_q, :s_k] | (partial_el[:, :s_q, :s_k] & allowed_by_mod)
    assert torch.equal(seen, mask.allowed()[:, 0])
    assert full.any() and partial.any() and (~(partial | full)).any()  # all three kinds occur
    if cp == 1:
        ref = create_block_mask(block_mask.mask_mod, 2, None, s_q, s_k, device="cpu", BLOCK_SIZE=size)
        ref_partial, ref_full, _, _ = _kept(ref, size)
        assert torch.equal(partial, ref_partial) and torch.equal(full, ref_full)


# -- the choice of kernel ------------------------------------------------------------------------
def test_kernel_choice_for_each_device_dtype_dropout_cp_and_signature():
    choose = da.document_attention_kernel
    bf16, fp32, sm90 = torch.bfloat16, torch.float32, (9, 0)
    for signature in SIGNATURES.values():
        assert choose(CUDA, bf16, 0.0, False, signature, True, sm90)[0] == "varlen"
        assert choose(CUDA, torch.float16, 0.0, False, signature, False, sm90)[0] == "varlen"
    sig = SIGNATURES["2.13"]
    cases = {  # (device, dtype, dropout, under CP, signature, flex, capability) -> kernel
        (CPU, fp32, 0.0, False, sig, True, None): "chunked",
        (CPU, bf16, 0.1, False, sig, True, None): "chunked",
        (CPU, fp32, 0.0, True, sig, True, None): "dense",
        (CUDA, bf16, 0.0, False, None, True, sm90): "flex",      # torch 2.9: no varlen_attn
        (CUDA, fp32, 0.0, False, sig, True, sm90): "flex",
        (CUDA, bf16, 0.0, False, sig, True, (7, 5)): "flex",
        (CUDA, bf16, 0.0, True, sig, True, sm90): "flex",        # keys from other CP ranks
        (CUDA, bf16, 0.1, False, sig, True, sm90): "chunked",    # neither varlen nor flex has dropout
        (CUDA, fp32, 0.1, False, None, False, sm90): "chunked",
        (CUDA, bf16, 0.1, True, sig, True, sm90): "dense",
        (CUDA, fp32, 0.0, False, sig, False, sm90): "dense",
        (CUDA, bf16, 0.0, True, sig, False, sm90): "dense",
    }
    for args, kernel in cases.items():
        assert choose(*args)[0] == kernel, args
    assert "dropout 0.1" in choose(CUDA, bf16, 0.1, False, sig, True, sm90)[1]
    assert "fp32" not in choose(CUDA, torch.float32, 0.0, False, sig, True, sm90)[1]  # says float32
    assert "sm75" in choose(CUDA, bf16, 0.0, False, sig, True, (7, 5))[1]
    assert da.varlen_signature(None) is None
    assert da.varlen_signature(lambda query, key, value: None) is None  # neither causal argument


def test_startup_line(monkeypatch):
    from megalite.config import ModelConfig

    assert da.startup_line(ModelConfig(), CPU, torch.float32, 1) == (
        "megalite: document attention: SDPA on query chunks (never the whole mask) because this is the CPU "
        "(torch's varlen and compiled flex kernels are CUDA's)")
    assert "whole additive mask" in da.startup_line(ModelConfig(), CPU, torch.float32, 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for release, words in (("2.10", "is_causal causal, GQA by expanding KV heads"),
                           ("2.11", "window_size causal, GQA by expanding KV heads"),
                           ("2.13", "window_size causal, GQA by enable_gqa")):
        monkeypatch.setattr(da, "installed_varlen_attn", lambda: RELEASES[release])
        line = da.startup_line(ModelConfig(), CUDA, torch.bfloat16, 1)
        assert line.startswith(f"megalite: document attention: torch varlen_attn ({words}) because"), line
    line = da.startup_line(ModelConfig(attention_dropout=0.1), CUDA, torch.bfloat16, 1)
    assert line.startswith("megalite: document attention: SDPA on query chunks") and "dropout 0.1" in line


def test_the_training_loop_logs_the_line_once_with_the_flag():
    from types import SimpleNamespace

    from megalite.config import Config, DataConfig
    from megalite.training import loop

    for flag, rank, expected in ((True, 0, 1), (False, 0, 0), (True, 1, 0)):
        lines = []
        trainer = SimpleNamespace(cfg=Config(data=DataConfig(reset_attention_mask=flag)), device=CPU,
                                  dtype=torch.float32, pstate=SimpleNamespace(rank=rank, cp_size=1), log=lines.append)
        loop._log_document_attention(trainer)
        assert lines == [da.startup_line(trainer.cfg.model, CPU, torch.float32, 1)] * expected


# -- GPU tier ------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# bf16 kernels against the fp32 reference, as relative errors in the Frobenius norm: bf16 rounds
# q, k, v and the output at 2^-9 relative (flash keeps the softmax in fp32); grads go through
# two more bf16 matmuls.
GPU_OUTPUT_TOL, GPU_GRAD_TOL = 1e-2, 2e-2


def _assert_near(got, want, output_tol=GPU_OUTPUT_TOL, grad_tol=GPU_GRAD_TOL):
    for name, a, b, tol in zip(("output", "dq", "dk", "dv"), got, want, (output_tol,) + (grad_tol,) * 3):
        error = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert error < tol, f"{name}: relative error {error:.2e} >= {tol}"


def _gpu_case(s=1024, b=2, n=8, g=2, d=64, seed=0):
    """Documents of 1 token to half the sample, bf16 on CUDA, and the fp32 whole-mask result and grads."""
    ids = _document_ids(b, s, seed).cuda()
    inputs = _inputs(s, b, n, g, d, seed, device=CUDA, dtype=torch.bfloat16)
    fp32 = [t.float() for t in inputs]
    mask32 = DocumentMask(ids)
    want = _run(lambda q, k, v: da.dense_document_attention(q, k, v, mask32, 0.0), fp32)
    return ids, inputs, want


@pytest.mark.gpu
@needs_cuda
def test_varlen_and_dense_on_gpu_match_fp32():
    ids, inputs, want = _gpu_case()
    kernel, reason = da.choose_kernel(inputs[0], 0.0, DocumentMask(ids))
    if da.installed_varlen_attn() is not None and torch.cuda.get_device_capability() >= (8, 0):
        assert kernel == "varlen", reason
    _assert_near(_run(lambda q, k, v: da.document_attention(q, k, v, DocumentMask(ids), 0.0), inputs), want)
    _assert_near(_run(lambda q, k, v: da.dense_document_attention(q, k, v, DocumentMask(ids), 0.0), inputs), want)
    _assert_near(_run(lambda q, k, v: da.chunked_document_attention(q, k, v, DocumentMask(ids), 0.0), inputs), want)
    installed = da.varlen_signature(da.installed_varlen_attn())
    if kernel == "varlen":  # also GQA by expanding the key/value heads (2.10/2.11) on the real kernel
        expanding = da.VarlenSignature(installed.causal, gqa=False)
        _assert_near(_run(lambda q, k, v: da.torch_varlen_attention(q, k, v, DocumentMask(ids), 0.0, expanding),
                          inputs), want)


@pytest.mark.gpu
@needs_cuda
def test_flex_on_gpu_matches_fp32_with_and_without_cp():
    """The compiled flex kernel, forward and backward, bf16 (also with s not a multiple of the
    128 block: 1000) and fp32; and a CP rank's queries against the gathered keys."""
    for s in (1024, 1000):
        ids, inputs, want = _gpu_case(s=s)
        _assert_near(_run(lambda q, k, v: da.flex_document_attention(q, k, v, DocumentMask(ids)), inputs), want)
    fp32 = [t.float() for t in inputs]
    assert da.choose_kernel(fp32[0], 0.0, DocumentMask(ids))[0] == "flex"
    _assert_near(_run(lambda q, k, v: da.document_attention(q, k, v, DocumentMask(ids), 0.0), fp32), want,
                 output_tol=2e-3, grad_tol=2e-3)  # (flex may use TF32 matmuls)
    ids, (q, k, v, grad_out), _ = _gpu_case(s=1024)
    mask, local, gathered = _cp_mask(ids.cpu(), rank=1, cp=2)
    mask = DocumentMask(*(t.cuda() for t in (mask.query_ids, mask.key_ids, mask.query_positions,
                                             mask.key_positions)))
    local, gathered = local.cuda(), gathered.cuda()
    grad_local = torch.zeros_like(grad_out)
    grad_local[local] = grad_out[local]
    assert da.choose_kernel(q, 0.0, mask)[0] == "flex"

    def cp_attention(q, k, v, fn):
        rows = fn(q[local], k[gathered], v[gathered], mask, 0.0)
        return torch.zeros(q.shape[0], *rows.shape[1:], dtype=rows.dtype, device=rows.device).index_copy(0, local, rows)
    want = _run(lambda q, k, v: cp_attention(q, k, v, da.dense_document_attention), [t.float() for t in (q, k, v)]
                + [grad_local.float()])
    _assert_near(_run(lambda q, k, v: cp_attention(q, k, v, da.document_attention), (q, k, v, grad_local)), want)
