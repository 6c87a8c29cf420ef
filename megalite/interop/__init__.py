"""Other projects' checkpoints <-> megalite: Hugging Face ``transformers`` (:mod:`.hf`) and
Megatron-LM (:mod:`.megatron`: tensor names and flags; :mod:`.megatron.legacy` ``mp_rank_*``
files; :mod:`.megatron.torch_dist` megatron-core ``dist_checkpointing``).

Converters work on *full* tensors keyed by megalite's global names; megalite's own checkpoints
are read and written for them by :mod:`megalite.checkpointing.convert`. ``checkpointing/`` is
megalite's own save/load; nothing there imports this package.
"""


class ConversionError(ValueError):
    """A config or checkpoint that cannot be converted (one message naming the field)."""


__all__ = ["ConversionError"]
