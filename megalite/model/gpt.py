"""GPTModel: embeddings, a range of transformer layers, final norm, output layer and loss.

One instance is one pipeline (virtual) stage: ``pre_process`` stages own the embeddings,
``post_process`` stages own the final norm, output layer and loss, and each holds layers
``[layer_start, layer_end)`` of the whole model. Every parameter is initialised from a seed
derived from the base seed and the parameter's place in the *whole* model, so any pipeline
split (and any TP size) starts from exactly the weights of the single-process model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel_state import ParallelState
from ..tensor_parallel import (VocabParallelEmbedding, checkpoint, init_method_normal, pad_vocab_size,
                               parallel_lm_logits, scatter_to_sequence_parallel,
                               vocab_parallel_cross_entropy)
from ..tensor_parallel.random import RNGStatesTracker
from .context_parallel import local_positions
from .document_mask import DocumentMask
from .moe import MoERecorder
from .transformer import ParallelContext, TransformerLayer, build_norm, rotary_cos_sin

# Offsets of the per-module init seeds (added to the base seed).
_WORD_EMBEDDING_SEED, _POSITION_EMBEDDING_SEED, _OUTPUT_LAYER_SEED, _LAYER_SEED = 1, 2, 3, 1000


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with the default CPU RNG seeded to ``seed``; restore the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class GPTModel(nn.Module):
    """A GPT (or Llama-style, per config) pipeline stage built from tensor-parallel layers."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, *, vocab_size: int, seed: int = 1234,
                 tracker: RNGStatesTracker | None = None, sequence_parallel: bool = False,
                 pre_process: bool = True, post_process: bool = True,
                 layer_start: int = 0, layer_end: int | None = None):
        super().__init__()
        self.cfg, self.pstate, self.vocab_size = cfg, pstate, vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel
        self.layer_start = layer_start
        self.layer_end = cfg.num_layers if layer_end is None else layer_end
        self.padded_vocab_size = pad_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, pstate.tp_size)
        self.ctx = ParallelContext(pstate, tracker, sequence_parallel)
        if cfg.num_experts:
            self.ctx.moe = MoERecorder()
            self.expert_offset = pstate.ep_rank * (cfg.num_experts // pstate.ep_size)  # first local expert
        self.input_tensor: torch.Tensor | None = None
        init = init_method_normal(cfg.init_method_std)
        tied = not cfg.untie_embeddings_and_output_weights

        if pre_process or (post_process and tied):
            # The last stage of a tied model holds an identical copy of the word embedding;
            # the embedding-group all-reduce of their grads keeps the two equal.
            with seeded(seed + _WORD_EMBEDDING_SEED):
                self.word_embeddings = VocabParallelEmbedding(
                    vocab_size, cfg.hidden_size, tp_group=pstate.tp_group,
                    padded_vocab_size=self.padded_vocab_size, init_method=init)
            self.word_embeddings.weight.shared_embedding = not pre_process
        if pre_process and cfg.position_embedding_type == "learned_absolute":
            with seeded(seed + _POSITION_EMBEDDING_SEED):
                self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                init(self.position_embeddings.weight)

        layers = []
        for index in range(self.layer_start, self.layer_end):
            with seeded(seed + _LAYER_SEED + index):
                layers.append(TransformerLayer(cfg, self.ctx, index))
        self.layers = nn.ModuleList(layers)

        if post_process:
            self.final_norm = build_norm(cfg, sequence_parallel)
            if not tied:
                with seeded(seed + _OUTPUT_LAYER_SEED):
                    self.output_layer = VocabParallelEmbedding(
                        vocab_size, cfg.hidden_size, tp_group=pstate.tp_group,
                        padded_vocab_size=self.padded_vocab_size, init_method=init)

    # -- pipeline plumbing ---------------------------------------------------------------
    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """Activation received from the previous stage (ignored on the first stage)."""
        self.input_tensor = tensor

    def output_weight(self) -> torch.Tensor:
        """The vocab-parallel ``[vocab/tp, h]`` weight of the output layer (tied or not)."""
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.word_embeddings.weight

    # -- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage.

        ``input_ids``/``labels`` are ``[b, s]``. Returns the hidden states ``[s, b, h]`` on
        non-last stages, the per-token loss ``[b, s]`` (fp32) on the last stage when labels are
        given, else the vocab-parallel logits ``[b, s, vocab/tp]``. ``position_ids`` ``[b, s]``
        may differ per sample (``--reset-position-ids``); ``document_ids [b, s]``
        (``--reset-attention-mask``) restrict attention to each token's document.
        """
        if position_ids is None:  # global positions: under CP, those of this rank's chunks
            position_ids = local_positions(input_ids.shape[1] * self.pstate.cp_size, self.pstate.cp_rank,
                                           self.pstate.cp_size, input_ids.device).unsqueeze(0)
        x = self._embed(input_ids, position_ids) if self.pre_process else self.input_tensor
        rotary = None
        if self.cfg.position_embedding_type == "rope":
            head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
            shared = position_ids.shape[0] == 1 or position_ids.stride(0) == 0  # one row broadcast
            positions = position_ids[0] if shared else position_ids  # else per sample (reset positions)
            rotary = rotary_cos_sin(positions, head_dim, self.cfg.rotary_base, x.dtype)
        x = self._run_layers(x, rotary, DocumentMask.for_stage(document_ids, self.pstate))
        if not self.post_process:
            return x
        x = self.final_norm(x)
        logits = parallel_lm_logits(x, self.output_weight(), self.pstate.tp_group, self.sequence_parallel)
        if labels is None:
            return logits.transpose(0, 1)
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.pstate.tp_group, self.vocab_size)
        return loss.t()

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.cfg.position_embedding_type == "learned_absolute":
            x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel(x, self.pstate.tp_group)
        if self.training and self.cfg.hidden_dropout > 0:
            with self.ctx.parallel_rng() if self.sequence_parallel else contextlib.nullcontext():
                x = F.dropout(x, self.cfg.hidden_dropout, training=True)
        return x

    def _run_layers(self, x: torch.Tensor, rotary, document_mask: DocumentMask | None) -> torch.Tensor:
        cfg, mask = self.cfg, document_mask
        if cfg.recompute_granularity != "full" or not self.training:
            for layer in self.layers:
                x = layer(x, rotary, mask)
            return x
        n = cfg.recompute_num_layers or 1
        if cfg.recompute_method == "uniform":  # checkpoint chunks of n layers
            for start in range(0, len(self.layers), n):
                chunk = self.layers[start:start + n]
                x = checkpoint(_run_chunk(chunk), self.ctx.tracker, x, mask, *(rotary or ()))
            return x
        for i, layer in enumerate(self.layers):  # "block": checkpoint the first n layers only
            if i < n:
                x = checkpoint(_run_chunk([layer]), self.ctx.tracker, x, mask, *(rotary or ()))
            else:
                x = layer(x, rotary, mask)
        return x


def _run_chunk(layers):
    def run(x, document_mask, *rotary):
        for layer in layers:
            x = layer(x, tuple(rotary) or None, document_mask)
        return x
    return run
