"""Data pipeline: tokenizers, Megatron ``.bin/.idx`` files, GPT datasets, blending, samplers.

Everything here imports only numpy (heavy tokenizer libraries load lazily), so the
preprocessing tools stay free of torch.
"""
from megalite.data.blended_dataset import BlendedDataset
from megalite.data.builtin_corpus import builtin_corpus_prefix
from megalite.data.document_masks import DocumentMaskedDataset, ltor_masks_and_position_ids
from megalite.data.gpt_dataset import (GPTDataset, build_train_valid_test_datasets,
                                       train_valid_test_num_samples)
from megalite.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder,
                                           IndexedDatasetError, merge_indexed_datasets)
from megalite.data.mock_dataset import MockGPTDataset
from megalite.data.samplers import MegatronPretrainingSampler
from megalite.data.sft import PackedSFTDataset
from megalite.data.tokenizers import build_tokenizer

__all__ = [
    "BlendedDataset", "DocumentMaskedDataset", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
    "IndexedDatasetError", "MegatronPretrainingSampler", "MockGPTDataset", "PackedSFTDataset",
    "build_tokenizer", "build_train_valid_test_datasets", "builtin_corpus_prefix",
    "ltor_masks_and_position_ids", "merge_indexed_datasets", "train_valid_test_num_samples",
]
