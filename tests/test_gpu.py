"""The GPU tier (``python -m pytest -m gpu``): megalite's CUDA paths against their CPU / fp32 references.

Each test needs one CUDA device (sm80+; grouped GEMM sm90+) and well under 1 GiB of its
memory, and runs in seconds. Without CUDA they are skipped (tests/conftest.py). Tolerances,
as ``|got - ref| <= rtol * max|ref| + atol`` per tensor unless said otherwise, and why:

* grouped GEMM vs the expert loop, both CUDA bf16: 1e-2 of the max (both accumulate in fp32 and
  round once to bf16, whose step is 2^-8 = 3.9e-3 relative); vs the CPU fp32 loop: 3e-2 (the
  bf16 rounding of the hidden activations on top);
* fused AdamW, CUDA bf16 params with fp32 main params vs the CPU fp32 step from the same
  (bf16-representable) weights and grads: fp32 rounding only, 1e-6 of the max (a weight decay
  left out would be ``lr x 0.01 x w``, 1e-5 of it); the bf16 params equal the fp32 main params
  rounded, exactly;
* a bf16 training run on CUDA vs the fp32 run on the CPU, same flags: every iteration's loss
  within 5e-3 relative, the first grad norm within 2e-2 (bf16 against fp32 on the CPU measured
  at most 1.3e-4 on the loss over 6 iterations, tests/equivalence.py's BF16; a missing grad
  reduction or update moves the loss by 1e-2 or more within a few iterations at this lr);
* a checkpoint written on CUDA (fp32) and resumed on the CPU: the loaded weights equal the saved
  ones bit for bit, and the next two iterations' losses (the second one after an update that
  uses the loaded Adam moments) equal the uninterrupted CUDA run's within 1e-3 relative (fp32 on
  both devices: summation order, and TF32 where a CUDA attention kernel uses it; Adam moments
  not restored measured 7e-3);
* document attention on CUDA vs the per-document attention written out on the CPU in fp32:
  fp32 5e-3 of the max (TF32-level), bf16 3e-2 (outputs) and 5e-2 (grads of q, k and v).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalite.config import ModelConfig, parse_args
from megalite.data.build import build_datasets
from megalite.model.core_attention import sdpa_attention
from megalite.model.document_mask import DocumentMask
from megalite.model.moe import experts as moe_experts
from megalite.parallel_state import ParallelState
from megalite.training import Trainer, train

pytestmark = pytest.mark.gpu
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")

# A small model (2 layers, h 64, 4 heads of 16, s 64) on deterministic mock tokens.
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "0",
         "--lr-decay-style", "constant", "--mock-data", "--vocab-size", "128", "--eval-interval", "0",
         "--log-interval", "1", "--clip-grad", "1.0"]


def assert_close_to_max(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """``|got - ref| <= rtol * max|ref| + atol``, elementwise, compared on the CPU in fp32."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    error, bound = (got - ref).abs().max().item(), rtol * ref.abs().max().item() + atol
    assert error <= bound, f"{what}: max |got - ref| = {error:.3e} > {bound:.3e}"


# -- grouped GEMM ----------------------------------------------------------------------------
def _experts(grouped: bool, device, dtype):
    cfg = ModelConfig(hidden_size=64, ffn_hidden_size=128, swiglu=True, num_experts=8, moe_router_topk=2,
                      moe_grouped_gemm=grouped)
    torch.manual_seed(0)
    return moe_experts.LocalExperts(cfg, ParallelState.from_sizes(ep=1), base_seed=1234).to(device, dtype)


def _expert_pass(experts, x, token, expert, weight):
    """Output and the grads of the input, routing weights and expert weights of one forward and
    backward against a fixed random output grad."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = experts(x, token, expert, weight)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return {"out": out, "x.grad": x.grad, "weight.grad": weight.grad,  # (an idle expert's grads: None in the loop)
            **{f"{n}.grad": torch.zeros_like(p) if p.grad is None else p.grad for n, p in experts.named_parameters()}}


def test_grouped_gemm_matches_the_expert_loop():
    """--moe-grouped-gemm (two torch._grouped_mm calls over the experts) equals the loop over
    experts on CUDA bf16, and the loop in fp32 on the CPU; an expert with no token included."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90+ (H100/H200)")
    gen = torch.Generator().manual_seed(0)
    tokens, topk = 96, 2
    x = torch.randn(tokens, 64, generator=gen)
    token = torch.arange(tokens).repeat_interleave(topk)
    expert = torch.stack([torch.randperm(7, generator=gen)[:topk] for _ in range(tokens)]).reshape(-1)  # 7 idle
    weight = torch.rand(tokens * topk, generator=gen)
    calls = []
    grouped_mm = torch._grouped_mm

    def counting_grouped_mm(*args, **kwargs):
        calls.append(1)
        return grouped_mm(*args, **kwargs)
    torch._grouped_mm = counting_grouped_mm
    try:
        on_cuda = [x.to(CUDA, torch.bfloat16), token.to(CUDA), expert.to(CUDA), weight.to(CUDA)]
        grouped = _expert_pass(_experts(True, CUDA, torch.bfloat16), *on_cuda)
    finally:
        torch._grouped_mm = grouped_mm
    assert calls, "the grouped GEMM path did not run"
    loop = _expert_pass(_experts(False, CUDA, torch.bfloat16), *on_cuda)
    cpu_fp32 = _expert_pass(_experts(False, CPU, torch.bfloat16).float(), x.bfloat16().float(), token, expert, weight)
    assert set(grouped) == set(loop) == set(cpu_fp32)
    for name in grouped:
        assert_close_to_max(grouped[name], loop[name], 1e-2, what=f"grouped vs loop, {name}")
        assert_close_to_max(grouped[name], cpu_fp32[name], 3e-2, what=f"grouped vs CPU fp32, {name}")


# -- fused AdamW on bf16 params with fp32 main params ----------------------------------------
def _trainer(argv, device) -> Trainer:
    cfg = parse_args(argv)
    return Trainer(cfg, ParallelState.from_config(cfg), 128, device=device, log=lambda msg: None)


def test_fused_adamw_on_bf16_params_matches_the_cpu_fp32_step():
    """Three optimizer steps (clipping, weight decay groups, Adam) with the same grads: CUDA bf16
    params via fp32 main params and torch's fused CUDA AdamW, against the fp32 model on the CPU."""
    gpu, cpu = _trainer(MODEL + ["--bf16"], CUDA), _trainer(MODEL, CPU)
    assert gpu.optimizer.optimizer.defaults["fused"] and gpu.optimizer.copy_back
    gpu_frags, cpu_frags = gpu.optimizer.fragments, cpu.optimizer.fragments
    assert [f.name for f in gpu_frags] == [f.name for f in cpu_frags]
    with torch.no_grad():
        for g, c in zip(gpu_frags, cpu_frags):
            c.main.copy_(g.main.cpu())  # the CPU model starts from the bf16-rounded weights
            assert g.main.dtype == torch.float32 and g.main.is_cuda and g.param.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        with torch.no_grad():
            for g, c in zip(gpu_frags, cpu_frags):
                grad = torch.randn(c.main.shape, generator=gen) * 0.01
                c.main.grad.copy_(grad)
                g.main.grad.copy_(grad.to(CUDA))
        (gpu_updated, gpu_norm), (cpu_updated, cpu_norm) = gpu.optimizer.step(), cpu.optimizer.step()
        assert gpu_updated and cpu_updated
        assert abs(gpu_norm - cpu_norm) <= 1e-5 * cpu_norm, (step, gpu_norm, cpu_norm)
        for g, c in zip(gpu_frags, cpu_frags):
            assert_close_to_max(g.main, c.main, 1e-6, what=f"step {step + 1}, {g.name}")
            param = g.buffer.param_data[g.start:g.end]
            assert torch.equal(param, g.main.to(torch.bfloat16)), f"{g.name}: bf16 params are not the rounded main params"


# -- whole runs ------------------------------------------------------------------------------
def _train(argv, device, tmp_path) -> dict:
    """Train in this process on ``device``: losses, grad norms, and the weights before the first
    step (``first``, after a ``--load``) and at the end (``last``), on the CPU."""
    cfg = parse_args(argv + ["--data-cache-path", str(tmp_path / "cache")])
    datasets, vocab = build_datasets(cfg, log=lambda msg: None)
    trainer = Trainer(cfg, ParallelState.from_config(cfg), vocab, device=device, log=lambda msg: None)
    weights = lambda: {n: p.detach().cpu().clone() for n, p in trainer.model[0].named_parameters()}  # noqa: E731
    first: dict = {}
    train_step = trainer.train_step

    def snapshot_then_step(microbatches):
        if not first:
            first.update(weights())
        return train_step(microbatches)
    trainer.train_step = snapshot_then_step
    history = train(trainer, datasets)
    return {"loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
            "first": first, "last": weights()}


def test_bf16_run_on_cuda_matches_the_cpu_fp32_run(tmp_path):
    iters = ["--train-iters", "8"]
    gpu, cpu = _train(MODEL + iters + ["--bf16"], CUDA, tmp_path), _train(MODEL + iters, CPU, tmp_path)
    assert len(gpu["loss"]) == len(cpu["loss"]) == 8
    assert cpu["loss"][-1] < cpu["loss"][0] - 0.05  # it learns, so a wrong update would show
    for it, (got, ref) in enumerate(zip(gpu["loss"], cpu["loss"]), 1):
        assert abs(got - ref) <= 5e-3 * abs(ref), f"iteration {it}: CUDA bf16 loss {got} vs CPU fp32 {ref}"
    assert abs(gpu["grad_norm"][0] - cpu["grad_norm"][0]) <= 2e-2 * cpu["grad_norm"][0], \
        (gpu["grad_norm"][0], cpu["grad_norm"][0])


def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    """Save at iteration 3 on CUDA, resume on the CPU: the loaded weights are the saved ones,
    bit for bit, and iterations 4 and 5 give the losses of the uninterrupted CUDA run."""
    save, five = str(tmp_path / "ckpt"), ["--train-iters", "5"]
    straight = _train(MODEL + five, CUDA, tmp_path)
    saving = _train(MODEL + five + ["--save", save, "--exit-interval", "3"], CUDA, tmp_path)
    resumed = _train(MODEL + five + ["--load", save], CPU, tmp_path)
    assert len(saving["loss"]) == 3 and len(resumed["loss"]) == 2
    assert resumed["first"].keys() == saving["last"].keys()
    for name, saved in saving["last"].items():
        assert torch.equal(resumed["first"][name], saved), f"{name}: loaded on the CPU != saved on CUDA"
    for it, got, ref in zip((4, 5), resumed["loss"], straight["loss"][3:]):
        assert abs(got - ref) <= 1e-3 * abs(ref), f"iteration {it} resumed on the CPU: loss {got}, on CUDA {ref}"


# -- document attention ----------------------------------------------------------------------
def _document_ids(device) -> torch.Tensor:
    """``[2, 128]``: sample 0 packs documents of 30, 1, 60 and 37 tokens; sample 1 is one document."""
    lengths = [[30, 1, 60, 37], [128]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths]).to(device)


def _reference_document_attention(q, k, v, ids):
    """Causal attention within documents, written out (fp32, CPU): ``q [s, b, n, d]``, ``k, v [s, b, g, d]``."""
    s, b, n, d = q.shape
    k, v = (t.repeat_interleave(n // t.shape[2], dim=2) for t in (k, v))  # query head h uses group h // (n/g)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / d ** 0.5
    position = torch.arange(s)
    allowed = (ids[:, None, :, None] == ids[:, None, None, :]) & (position[:, None] >= position[None, :])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, n * d)


def _dense_document_attention(q, k, v, dropout, ctx, document_mask):
    """The dense fallback: SDPA with the whole ``[b, 1, s, s]`` additive mask built on the device."""
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask.additive(q.dtype), dropout_p=dropout,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _attention_pass(fn, q, k, v, out_grad, *args):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, *args)
    out.backward(out_grad.to(out))
    return {"out": out, "q.grad": q.grad, "k.grad": k.grad, "v.grad": v.grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_document_attention_on_cuda_matches_the_cpu_reference(dtype):
    """The dense whole-mask path on CUDA, and the kernel megalite's attention picks on CUDA for a
    document mask, against the per-document attention written out on the CPU (GQA: 8 query
    heads, 2 key/value groups)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(128, 2, 8, 64, generator=gen).to(dtype)
    k, v = (torch.randn(128, 2, 2, 64, generator=gen).to(dtype) for _ in range(2))
    out_grad = torch.randn(128, 2, 8 * 64, generator=gen)
    ref = _attention_pass(lambda *t: _reference_document_attention(*t, _document_ids(CPU)),
                          *(t.float() for t in (q, k, v)), out_grad)
    rtol = {"out": 5e-3, "grad": 5e-3} if dtype == torch.float32 else {"out": 3e-2, "grad": 5e-2}
    on_cuda = [t.to(CUDA) for t in (q, k, v)]
    for name, fn in (("dense", _dense_document_attention), ("megalite", sdpa_attention)):
        got = _attention_pass(fn, *on_cuda, out_grad, 0.0, None, DocumentMask(_document_ids(CUDA)))
        assert got["out"].is_cuda and got["out"].dtype == dtype
        for key in ref:
            assert_close_to_max(got[key], ref[key], rtol["out" if key == "out" else "grad"],
                                what=f"{name} {dtype} {key}")
