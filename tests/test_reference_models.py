"""The serial megalite model against an independent plain-PyTorch reference (tests/reference_models.py).

For each model option the single-process GPTModel's weights are copied into the reference (the
mapping below is the only place that knows both layouts), and on the same random tokens the
logits, the per-token and mean loss, and the gradient of *every* megalite parameter must match.
A whole training run (Trainer: grad accumulation, clipping, AdamW with Megatron's weight-decay
rule, the LR schedule) is checked against the reference trained with plain torch.optim.AdamW.
"""
from __future__ import annotations

import math

import pytest
import torch

from megalite.config import parse_args
from megalite.data.mock_dataset import MockGPTDataset
from megalite.model import build_model
from megalite.parallel_state import ParallelState
from megalite.training import BatchIterator, Trainer
from reference_models import ReferenceConfig, ReferenceGPT

# Logits, losses and grads equal the reference to this, elementwise: |got - want| <= atol + rtol |want|.
# Both models run in float64 for it (megalite's cross entropy still computes in fp32): in fp32,
# logits of magnitude ~2 differ by up to ~4 ulps (1e-6) between the two and 1e-6 is not robust.
# The fp32 path is checked by the training test below (1e-5).
TOL = dict(rtol=1e-6, atol=1e-6)
DTYPE = torch.float64

VOCAB, PADDED_VOCAB, BATCH, SEQ = 100, 128, 2, 16  # megalite pads the vocabulary to a multiple of 128
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", str(VOCAB), "--mock-data"]
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
            ffn_hidden_size=128, max_positions=16)
LLAMA_FLAGS = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
               "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2",
               "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "48"]
LLAMA_REF = dict(position_embedding="rope", norm="RMSNorm", activation="swiglu", bias=False,
                 num_kv_heads=2, tie_word_embeddings=False, ffn_hidden_size=48)

# option: (megalite flags, the same model described to the reference)
CASES = {
    "gpt": ([], {}),
    "layernorm_eps": (["--norm-epsilon", "1e-2"], dict(norm_eps=1e-2)),
    "rope": (["--position-embedding-type", "rope"], dict(position_embedding="rope")),
    "rope_base_100": (["--position-embedding-type", "rope", "--rotary-base", "100"],
                      dict(position_embedding="rope", rope_theta=100.0)),
    "rmsnorm": (["--normalization", "RMSNorm", "--norm-epsilon", "1e-2"], dict(norm="RMSNorm", norm_eps=1e-2)),
    # Megatron's SwiGLU size rule, 2/3 of 4h rounded down to 64, floored at 64 by megalite
    "swiglu": (["--swiglu"], dict(activation="swiglu", ffn_hidden_size=64)),
    "gqa_2_groups": (["--group-query-attention", "--num-query-groups", "2"], dict(num_kv_heads=2)),
    "mqa_1_group": (["--group-query-attention", "--num-query-groups", "1"], dict(num_kv_heads=1)),
    "untied": (["--untie-embeddings-and-output-weights"], dict(tie_word_embeddings=False)),
    "no_bias": (["--disable-bias-linear"], dict(bias=False)),
    "openai_gelu": (["--openai-gelu"], dict(activation="gelu_tanh")),
    "llama": (LLAMA_FLAGS, LLAMA_REF),
}


# -- the weight mapping: megalite layout <-> reference (Hugging Face) layout ---------------
def _linear_keys(rc: ReferenceConfig) -> list[str]:
    return ["weight", "bias"] if rc.bias else ["weight"]


def _norm_keys(rc: ReferenceConfig) -> list[str]:
    return ["weight", "bias"] if rc.norm == "LayerNorm" else ["weight"]


def _pairs(rc: ReferenceConfig) -> list[tuple[str, str]]:
    """(megalite name, reference name) of the tensors that map one to one (vocab rows aside)."""
    pairs = [("word_embeddings.weight", "embed_tokens.weight")]
    if rc.position_embedding == "learned_absolute":
        pairs.append(("position_embeddings.weight", "embed_positions.weight"))
    for i in range(rc.num_layers):
        m, r = f"layers.{i}.", f"layers.{i}."
        for k in _norm_keys(rc):
            pairs += [(f"{m}norm_1.{k}", f"{r}input_layernorm.{k}"),
                      (f"{m}norm_2.{k}", f"{r}post_attention_layernorm.{k}")]
        for k in _linear_keys(rc):
            pairs += [(f"{m}attention.proj.{k}", f"{r}self_attn.o_proj.{k}"),
                      (f"{m}mlp.fc2.{k}", f"{r}mlp.down_proj.{k}")]
            if rc.activation != "swiglu":
                pairs.append((f"{m}mlp.fc1.{k}", f"{r}mlp.up_proj.{k}"))
    pairs += [(f"final_norm.{k}", f"norm.{k}") for k in _norm_keys(rc)]
    if not rc.tie_word_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    return pairs


def to_reference(meg: dict[str, torch.Tensor], rc: ReferenceConfig) -> dict[str, torch.Tensor]:
    """megalite tensors (weights or grads) by megalite name -> reference tensors by reference name.
    Every megalite entry must be consumed: one the mapping does not know fails."""
    meg, out = dict(meg), {}
    for m, r in _pairs(rc):
        t = meg.pop(m)
        out[r] = t[:rc.vocab_size] if m in ("word_embeddings.weight", "output_layer.weight") else t
    d, per_group = rc.hidden_size // rc.num_heads, rc.num_heads // rc.num_kv_heads
    for i in range(rc.num_layers):
        m, r = f"layers.{i}.", f"layers.{i}."
        for k in _linear_keys(rc):
            # fused QKV rows per key/value group: [q_1 .. q_per_group, k, v], each head_dim rows
            qkv = meg.pop(f"{m}attention.qkv.{k}")
            rest = qkv.shape[1:]
            qkv = qkv.reshape(rc.num_kv_heads, per_group + 2, d, *rest)
            out[f"{r}self_attn.q_proj.{k}"] = qkv[:, :per_group].reshape(-1, *rest)
            out[f"{r}self_attn.k_proj.{k}"] = qkv[:, per_group].reshape(-1, *rest)
            out[f"{r}self_attn.v_proj.{k}"] = qkv[:, per_group + 1].reshape(-1, *rest)
            if rc.activation == "swiglu":  # fc1 rows: [gate; up]
                gate, up = meg.pop(f"{m}mlp.fc1.{k}").chunk(2, dim=0)
                out[f"{r}mlp.gate_proj.{k}"], out[f"{r}mlp.up_proj.{k}"] = gate, up
    assert not meg, f"megalite parameters the reference mapping does not cover: {sorted(meg)}"
    return out


def from_reference(ref: dict[str, torch.Tensor], rc: ReferenceConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_reference`; the padded vocabulary rows are zeros (their megalite
    weights stay zero and their grads must be zero). Every reference entry must be consumed."""
    ref, out = dict(ref), {}
    for m, r in _pairs(rc):
        t = ref.pop(r)
        if m in ("word_embeddings.weight", "output_layer.weight"):
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        out[m] = t
    d, per_group = rc.hidden_size // rc.num_heads, rc.num_heads // rc.num_kv_heads
    for i in range(rc.num_layers):
        m, r = f"layers.{i}.", f"layers.{i}."
        for k in _linear_keys(rc):
            q, kk, v = (ref.pop(f"{r}self_attn.{p}_proj.{k}") for p in "qkv")
            rest = q.shape[1:]
            groups = [q.reshape(rc.num_kv_heads, per_group, d, *rest), kk.reshape(rc.num_kv_heads, 1, d, *rest),
                      v.reshape(rc.num_kv_heads, 1, d, *rest)]
            out[f"{m}attention.qkv.{k}"] = torch.cat(groups, dim=1).reshape(-1, *rest)
            if rc.activation == "swiglu":
                out[f"{m}mlp.fc1.{k}"] = torch.cat([ref.pop(f"{r}mlp.gate_proj.{k}"), ref.pop(f"{r}mlp.up_proj.{k}")])
    assert not ref, f"reference parameters the mapping does not cover: {sorted(ref)}"
    return out


def load_reference(ref: ReferenceGPT, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(ref.named_parameters())  # a tied lm_head is embed_tokens (listed once)
    assert sorted(params) == sorted(tensors), "reference parameters and mapped megalite weights differ"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def _serial_model(flags: list[str]):
    cfg = parse_args(TINY + flags)
    (model,) = build_model(cfg, ParallelState.from_sizes(), VOCAB)
    assert model.padded_vocab_size == PADDED_VOCAB
    return model


# -- forward, loss and every gradient ------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_serial_model_matches_reference(case):
    flags, overrides = CASES[case]
    rc = ReferenceConfig(**{**BASE, **overrides})
    model = _serial_model(flags).to(DTYPE)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init (norms 1, biases and padded rows 0) so a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The mapping is a bijection on the real weights (padded vocabulary rows dropped).
    back = from_reference(to_reference(weights, rc), rc, PADDED_VOCAB)
    for name, w in weights.items():
        w = w.clone()
        if name in ("word_embeddings.weight", "output_layer.weight"):
            w[VOCAB:] = 0
        torch.testing.assert_close(back[name], w, rtol=0, atol=0, msg=name)

    ref = ReferenceGPT(rc).to(DTYPE)
    load_reference(ref, to_reference(weights, rc))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)

    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (BATCH, SEQ, PADDED_VOCAB)
        torch.testing.assert_close(logits[..., :VOCAB], ref(tokens), **TOL, msg=lambda m: f"logits: {m}")

    loss, ref_loss = model(tokens, labels=labels), ref(tokens, labels)
    assert loss.shape == ref_loss.shape == (BATCH, SEQ)
    torch.testing.assert_close(loss, ref_loss, **TOL, check_dtype=False, msg=lambda m: f"per-token loss: {m}")
    torch.testing.assert_close(loss.mean(), ref_loss.mean(), **TOL, check_dtype=False, msg=lambda m: f"mean loss: {m}")
    loss.mean().backward()
    ref_loss.mean().backward()

    want = from_reference({n: p.grad for n, p in ref.named_parameters()}, rc, PADDED_VOCAB)
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(want)  # every megalite parameter has a reference gradient
    for name, p in got.items():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, want[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


# -- a whole training run: megalite's Trainer vs the reference with plain torch ----------
# Adam's eps: with Megatron's 1e-8, an element whose grad is ~eps (the key bias, whose true grad is 0,
# and a few others) gets an update lr * m / (sqrt(v) + eps) as sensitive as lr / eps to the fp32
# rounding (~1e-8) of its grad, so two correct implementations end up ~lr/30 apart there. With 1e-4
# (still far below the ~1e-3 grads) that sensitivity is ~3e-7 per step, well inside PARAM_TOL.
TRAIN = dict(micro_batch=2, global_batch=4, iters=3, lr=3e-3, min_lr=0.0, warmup=0, weight_decay=0.1, clip=1.0,
             adam_eps=1e-4)
TRAIN_CASES = {
    "gpt": ([], {}, {}),
    "llama_warmup_min_lr": (LLAMA_FLAGS, LLAMA_REF, dict(iters=5, warmup=1, min_lr=3e-4)),
}
LOSS_RTOL = 1e-5                        # loss and grad norm per iteration, relative
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)  # every weight after the last iteration


def megatron_lr(iteration: int, hp: dict) -> float:
    """Megatron's OptimizerParamScheduler (linear warmup, cosine decay to min-lr over
    lr-decay-iters = train-iters); iteration i (1-based) trains with lr(i - 1)."""
    step, warmup, decay = iteration - 1, hp["warmup"], hp["iters"]
    if warmup > 0 and step <= warmup:
        return hp["lr"] * step / warmup
    if step > decay:
        return hp["min_lr"]
    ratio = (step - warmup) / (decay - warmup)
    return hp["min_lr"] + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (hp["lr"] - hp["min_lr"])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_training_run_matches_reference(case):
    flags, overrides, hp_overrides = TRAIN_CASES[case]
    hp = {**TRAIN, **hp_overrides}
    rc = ReferenceConfig(**{**BASE, **overrides})
    cfg = parse_args(TINY + flags + [
        "--micro-batch-size", str(hp["micro_batch"]), "--global-batch-size", str(hp["global_batch"]),
        "--train-iters", str(hp["iters"]), "--lr", str(hp["lr"]), "--min-lr", str(hp["min_lr"]),
        "--lr-warmup-iters", str(hp["warmup"]), "--weight-decay", str(hp["weight_decay"]),
        "--clip-grad", str(hp["clip"]), "--adam-eps", str(hp["adam_eps"])])
    pstate = ParallelState.from_sizes()
    trainer = Trainer(cfg, pstate, VOCAB, log=lambda *a: None)
    (chunk,) = trainer.model
    assert chunk.padded_vocab_size == PADDED_VOCAB

    ref = ReferenceGPT(rc)
    load_reference(ref, to_reference({n: p.detach().clone() for n, p in chunk.named_parameters()}, rc))
    decay = [p for n, p in ref.named_parameters() if not (p.ndim == 1 or n.endswith(".bias"))]
    no_decay = [p for n, p in ref.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
    assert no_decay  # norm weights at least
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.999), eps=hp["adam_eps"])

    dataset = MockGPTDataset(hp["iters"] * hp["global_batch"], SEQ, VOCAB, seed=cfg.training.seed)
    batches = BatchIterator(dataset, cfg, pstate)
    n_micro = hp["global_batch"] // hp["micro_batch"]
    for it in range(1, hp["iters"] + 1):
        microbatches = batches.next_microbatches(n_micro)
        ref_batches = [{k: v.clone() for k, v in mb.items()} for mb in microbatches]
        stats = trainer.train_step(microbatches)

        lr = megatron_lr(it, hp)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        tokens = sum(mb["loss_mask"].sum() for mb in ref_batches)
        loss_sum = 0.0
        for mb in ref_batches:  # gradient accumulation: loss = sum of token losses / global tokens
            token_losses = (ref(mb["tokens"], mb["labels"]) * mb["loss_mask"]).sum()
            (token_losses / tokens).backward()
            loss_sum += token_losses.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), hp["clip"]).item()
        opt.step()

        assert stats["updated"]
        assert stats["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15), f"iteration {it}: lr"
        assert stats["loss"] == pytest.approx(loss_sum / tokens.item(), rel=LOSS_RTOL), f"iteration {it}: loss"
        assert stats["grad_norm"] == pytest.approx(grad_norm, rel=LOSS_RTOL), f"iteration {it}: grad norm"

    want = from_reference({n: p.detach() for n, p in ref.named_parameters()}, rc, PADDED_VOCAB)
    got = dict(chunk.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), want[name], **PARAM_TOL, msg=lambda m, name=name: f"{name}: {m}")
