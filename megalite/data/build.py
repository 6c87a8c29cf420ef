"""Choose and build the train/valid/test datasets from the data flags (used by pretrain_gpt.py)."""
from __future__ import annotations

from megalite.data.document_masks import DocumentMaskedDataset
from megalite.data.gpt_dataset import build_train_valid_test_datasets, train_valid_test_num_samples
from megalite.data.mock_dataset import MockGPTDataset
from megalite.data.tokenizers import build_tokenizer

BYTE_VOCAB_SIZE = 257  # 256 byte values + end-of-document
MOCK_VOCAB_SIZE = 1024


def build_tokenizer_from_config(data_cfg):
    """The tokenizer named by ``--tokenizer-type`` (ByteTokenizer for the built-in corpus)."""
    return build_tokenizer(data_cfg.tokenizer_type or "ByteTokenizer", vocab_file=data_cfg.vocab_file,
                           merge_file=data_cfg.merge_file, tokenizer_model=data_cfg.tokenizer_model,
                           vocab_size=data_cfg.vocab_size)


def build_datasets(cfg, log=print):
    """``((train, valid, test), vocab_size)`` for ``--mock-data``, ``--data-path`` or, with
    neither, the built-in corpus (Python standard library sources, byte-level tokens). With
    ``--reset-position-ids`` / ``--reset-attention-mask`` / ``--eod-mask-loss`` each dataset is
    wrapped in a :class:`DocumentMaskedDataset` (the tokenizer's EOD marks the documents).

    Pure file I/O with atomic cache writes: call it on global rank 0 first, then (after a
    barrier) on the other ranks, which then only read the caches.
    """
    t, lg, d = cfg.training, cfg.logging, cfg.data
    num_samples = train_valid_test_num_samples(t.train_iters, t.global_batch_size, lg.eval_interval,
                                               lg.eval_iters)
    seq = cfg.model.seq_length
    if d.mock_data:
        vocab = d.vocab_size or MOCK_VOCAB_SIZE
        return tuple(MockGPTDataset(n, seq, vocab, seed=t.seed + i) if n else None
                     for i, n in enumerate(num_samples)), vocab
    tokenizer = build_tokenizer_from_config(d)
    datasets = build_train_valid_test_datasets(d.data_path, d.split, seq, t.seed, num_samples,
                                               d.data_cache_path, tokenizer_eod=tokenizer.eod, log=log)
    if d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss:
        # Packed documents: positions, document ids and the EOD loss mask of each sample.
        datasets = tuple(None if ds is None else DocumentMaskedDataset(
            ds, tokenizer.eod, d.reset_position_ids, d.reset_attention_mask, d.eod_mask_loss) for ds in datasets)
    return datasets, tokenizer.vocab_size
