"""Tensor-parallel building blocks: communication pairs, sharded layers, vocab-parallel loss, RNG."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     init_method_normal, pad_vocab_size, parallel_lm_logits,
                     scaled_init_method_normal)
from .mappings import (copy_to_tensor_parallel, gather_from_sequence_parallel,
                       gather_from_tensor_parallel, reduce_from_tensor_parallel,
                       reduce_scatter_to_sequence_parallel, scatter_to_sequence_parallel,
                       scatter_to_tensor_parallel)
from .random import RNGStatesTracker, checkpoint, model_parallel_seed

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
    "vocab_parallel_cross_entropy", "pad_vocab_size", "init_method_normal",
    "scaled_init_method_normal", "copy_to_tensor_parallel", "reduce_from_tensor_parallel",
    "scatter_to_tensor_parallel", "gather_from_tensor_parallel", "scatter_to_sequence_parallel",
    "gather_from_sequence_parallel", "reduce_scatter_to_sequence_parallel", "RNGStatesTracker",
    "model_parallel_seed", "checkpoint",
]
