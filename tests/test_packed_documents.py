"""Packed documents (``--reset-position-ids --reset-attention-mask --eod-mask-loss``) are right.

* The masks and positions are megatron-core's (``_get_ltor_masks_and_position_ids``, an
  independent reference), for EODs anywhere: first, last, in a row, none.
* The proof that document masking works: a packed micro-batch of several documents gives, at
  every position, the loss of running that document alone through the ordinary causal model,
  and the sum of the documents' gradients (fp32, 1e-5), for learned and RoPE positions.
* The CPU path (SDPA on query chunks against the keys they can reach) and the varlen
  (``cu_seqlens``) layout the CUDA kernels take equal attention with the whole mask (the
  latter checked on CPU with a reference kernel written here).
* The flags reach the model through the data pipeline and change the run; --mock-data refuses them.
Every parallel layout against serial: tests/test_packed_documents_layouts.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from packed_data import EOD, PACKED, packed_argv, write_packed_corpus

pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")

# Token streams (inputs) with EODs first, last, in a row, nowhere, and many.
STREAMS = [
    [EOD, 1, 2, EOD, EOD, 3, 4, 5, EOD, 6],
    [1, 2, 3, 4, 5, 6, 7, 8],
    [1, EOD, 2, EOD, 3, EOD, 4, EOD],
    [EOD, EOD, EOD, 7],
]


def _stream(seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 20, n)
    tokens[rng.random(n) < 0.2] = EOD
    return tokens


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)], ids=["all", "positions", "attention", "loss"])
def test_masks_and_positions_match_megatron_core(flags):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megalite.data.document_masks import ltor_masks_and_position_ids
    from megalite.model.document_mask import DocumentMask

    for tokens in [np.array(s) for s in STREAMS] + [_stream(seed) for seed in range(5)]:
        ref_mask, ref_loss, ref_pos = _get_ltor_masks_and_position_ids(torch.from_numpy(tokens), EOD, *flags, True)
        doc_ids, loss_mask, positions = ltor_masks_and_position_ids(tokens, EOD, *flags)
        assert positions.tolist() == ref_pos.tolist(), tokens
        assert loss_mask.tolist() == ref_loss.tolist(), tokens
        if flags[1]:  # megatron: True = masked out; ours: True = may attend
            allowed = DocumentMask(torch.from_numpy(doc_ids)[None]).allowed()
            assert torch.equal(allowed[0, 0], ~ref_mask[0]), tokens
        else:
            assert doc_ids is None


def test_document_masked_dataset_fields():
    from megalite.data.document_masks import DocumentMaskedDataset

    sample = np.array([5, EOD, 6, 7, EOD, 8, 9])                      # 6 inputs + 1 label
    sft = [{"tokens": sample, "loss_mask": np.array([0, 0, 1, 1, 1, 0], np.float32)}]
    out = DocumentMaskedDataset([sample], EOD, True, True, True)[0]
    assert out["tokens"].tolist() == sample.tolist()
    assert out["document_ids"].tolist() == [0, 0, 1, 1, 1, 2]         # the EOD ends its document
    assert out["position_ids"].tolist() == [0, 1, 0, 1, 2, 0]
    assert out["loss_mask"].tolist() == [1, 0, 1, 1, 0, 1]           # no loss where the *input* is EOD
    out = DocumentMaskedDataset(sft, EOD, eod_mask_loss=True)[0]   # an SFT mask is kept and combined
    assert out["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0] and set(out) == {"tokens", "loss_mask"}
    with pytest.raises(ValueError, match="need a tokenizer with an end-of-document token"):
        DocumentMaskedDataset([sample], None, True)


# -- the proof: packed == each document alone ----------------------------------------------------
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True,
             group_query_attention=True, num_query_groups=2)


def _model(**options):
    from megalite.config import Config, ModelConfig, validate
    from megalite.model.gpt import GPTModel
    from megalite.parallel_state import ParallelState

    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, **options))
    validate(cfg)
    model = GPTModel(cfg.model, ParallelState.from_sizes(), vocab_size=EOD + 1)
    model.train()
    return model


def _grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("options,chunk", [({}, None), (LLAMA, None), ({}, 8), (LLAMA, 5),
                                           (dict(recompute_granularity="full", recompute_method="uniform"), 8),
                                           (dict(recompute_granularity="selective"), None)],
                         ids=["learned", "rope-gqa", "learned-chunks-of-8", "rope-gqa-chunks-of-5", "full-recompute",
                              "selective-recompute"])
def test_packed_documents_equal_each_document_alone(options, chunk, monkeypatch):
    """Two packed samples (documents cut at both ends, of every length, in a batch whose samples
    have different boundaries): the per-token loss at each position equals that of its document
    run alone through the plain causal model (so do the per-document sums), and the gradient of
    the packed batch equals the sum of the documents' gradients. ``chunk``: queries per SDPA
    call of the CPU path (the default 256 makes one chunk of these 32 tokens)."""
    from megalite.data.document_masks import ltor_masks_and_position_ids
    from megalite.model import document_attention

    if chunk:
        monkeypatch.setattr(document_attention, "DOCUMENT_QUERY_CHUNK", chunk)
    model = _model(**options)
    samples = np.stack([_stream(10, 33), _stream(11, 33)])
    fields = [ltor_masks_and_position_ids(s[:-1], EOD, True, True, True) for s in samples]
    doc_ids = torch.from_numpy(np.stack([f[0] for f in fields]))
    positions = torch.from_numpy(np.stack([f[2] for f in fields]))
    tokens = torch.from_numpy(samples)
    packed = model(tokens[:, :-1], position_ids=positions, labels=tokens[:, 1:], document_ids=doc_ids)
    packed.sum().backward()
    packed_grads = _grads(model)

    alone_losses = torch.zeros_like(packed)
    documents = 0
    for b in range(2):
        for d in doc_ids[b].unique():
            span = (doc_ids[b] == d).nonzero().flatten()
            start, end = int(span[0]), int(span[-1]) + 1
            alone = model(tokens[b:b + 1, start:end], labels=tokens[b:b + 1, start + 1:end + 1])  # plain causal
            alone.sum().backward()
            alone_losses[b, start:end] = alone[0].detach()
            documents += 1
            torch.testing.assert_close(packed[b, start:end].sum(), alone.sum(), rtol=1e-5, atol=0)
    assert documents >= 12
    torch.testing.assert_close(packed.detach(), alone_losses, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        scale = grad.abs().max().item()
        assert (packed_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-8, name
    # Without the document mask (positions alone are not enough) the losses differ.
    leaky = model(tokens[:, :-1], position_ids=positions, labels=tokens[:, 1:])
    assert (leaky - alone_losses).abs().max() > 1e-3


def _reference_varlen(q, k, v, cu_seqlens, max_seqlen, dropout):
    """What a varlen kernel computes, written out: causal attention per [start, end) segment."""
    out = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        assert end - start <= max_seqlen
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


def _whole_mask_attention(q, k, v, mask):
    """SDPA with the whole additive mask in one call (what the CUDA fallback and CP use)."""
    s, b = q.shape[:2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def test_chunked_and_varlen_attention_equal_the_whole_mask():
    """The CPU path (query chunks against the keys they can reach) and the varlen layout the CUDA
    kernels take (checked with a reference kernel written here) give the whole-mask attention's
    output and q/k/v grads, for chunks that split documents and key ranges that differ."""
    from megalite.data.document_masks import document_ids
    from megalite.model.document_attention import chunked_document_attention, varlen_attention
    from megalite.model.document_mask import DocumentMask

    torch.manual_seed(0)
    s, b, n, g, d = 40, 3, 4, 2, 8
    ids = torch.from_numpy(np.stack([document_ids(_stream(seed), EOD) for seed in range(b)]))
    mask = DocumentMask(ids)
    cu, max_seqlen = mask.varlen()
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s and max_seqlen == s
    assert len(cu) - 1 == sum(len(row.unique()) for row in ids)  # one segment per document per sample
    chunks = mask.query_chunks(7, torch.float32)
    assert [(a, e) for a, e, _, _ in chunks] == [(a, min(a + 7, s)) for a in range(0, s, 7)]
    assert any(0 < first < a for a, _, first, _ in chunks)  # some chunks skip earlier keys
    inputs = [torch.randn(s, b, n, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)]
    grad_out = torch.randn(s, b, n * d)
    results = []
    for fn in (lambda q, k, v: _whole_mask_attention(q, k, v, mask),
               lambda q, k, v: chunked_document_attention(q, k, v, mask, 0.0, chunk=7),
               lambda q, k, v: chunked_document_attention(q, k, v, mask, 0.0, chunk=64),
               lambda q, k, v: varlen_attention(q, k, v, mask, 0.0, _reference_varlen)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for got in results[1:]:
        for a, want in zip(got, results[0]):
            torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)


# -- wiring: flags -> data -> batch -> model ----------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("packed")
    return write_packed_corpus(str(directory)), str(directory / "cache")


def test_flags_reach_the_batch(corpus):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.model.document_mask import DocumentMask
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator

    cfg = parse_args(packed_argv(*corpus) + list(PACKED))
    (train, _, _), vocab = build_datasets(cfg, log=lambda m: None)
    assert vocab == EOD + 1
    (batch,) = BatchIterator(train, cfg, ParallelState.from_sizes()).next_microbatches(1)
    tokens = batch["tokens"]
    assert batch["document_ids"].shape == batch["position_ids"].shape == tokens.shape == (2, 16)
    assert (tokens == EOD).any(dim=1).all()  # every sample packs several documents
    assert torch.equal(batch["loss_mask"], (tokens != EOD).float())
    for row, ids, pos in zip(tokens, batch["document_ids"], batch["position_ids"]):
        ref_mask, _, ref_pos = _get_ltor_masks_and_position_ids(row, EOD, True, True, True, True)
        assert pos.tolist() == ref_pos.tolist()
        assert torch.equal(DocumentMask(ids[None]).allowed()[0, 0], ~ref_mask[0])


def test_mock_data_refuses_the_flags():
    from megalite.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--reset-attention-mask"])
    from megalite.config import Config, DataConfig, validate
    with pytest.raises(ValueError, match="--reset-position-ids / --eod-mask-loss need data with end-of-document"):
        validate(Config(data=DataConfig(mock_data=True, reset_position_ids=True, eod_mask_loss=True)))
