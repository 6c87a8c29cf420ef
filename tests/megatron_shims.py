"""Make megatron-core's GPTModel (local layer spec) run its forward pass on a CPU-only torch.

megatron-core assumes CUDA in three spots of that path; each shim below replaces only the device
choice (or a no-op RNG fork), never the math, so the test still runs megatron-core's own
embedding, attention, RoPE, MLP, norm and vocab-parallel code:

1. ``GlobalMemoryBuffer.get_tensor`` (the attention-score buffer of the local
   ``DotProductAttention``) allocates on ``torch.cuda.current_device()``: run it with
   ``current_device`` answering ``"cpu"``.
2. ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()`` on the first
   forward: same treatment (``inv_freq`` is already on the CPU, so the move is a no-op).
3. ``DotProductAttention`` forks the CUDA RNG tracker around attention dropout, which reads and
   sets the CUDA RNG state: replace the fork by a no-op context. Only valid because the tests
   use dropout 0 (no random numbers are drawn inside it).

A fourth CUDA spot needs no patch: without an ``attention_mask`` the unfused softmax builds its
default causal mask with ``device="cuda"``, so callers pass an explicit causal mask
(:func:`causal_mask`).

Apply the shims only in a process that runs megatron-core models (a spawned test worker), never
in the pytest process: they patch megatron-core classes for the rest of the process.
"""
from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch


def _with_cpu_as_current_device(method):
    """``method`` run with ``torch.cuda.current_device()`` returning ``"cpu"``."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
            return method(*args, **kwargs)
    wrapper.megalite_cpu_shim = True
    return wrapper


def apply_cpu_shims() -> None:
    """Install the three shims above (idempotent; a no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    from megatron.core import tensor_parallel, utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for cls, name in ((utils.GlobalMemoryBuffer, "get_tensor"), (RotaryEmbedding, "get_emb")):
        method = getattr(cls, name)
        if not getattr(method, "megalite_cpu_shim", False):
            setattr(cls, name, _with_cpu_as_current_device(method))
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()


def causal_mask(seq_length: int) -> torch.Tensor:
    """Megatron's boolean attention mask ``[1, 1, s, s]`` (True = masked out) for causal attention."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool), diagonal=1)


@contextlib.contextmanager
def cpu_dist_checkpointing():
    """Run megatron-core's own torch_dist writer (``dist_checkpointing.save``) and loader on a CPU-only
    torch in a spawned (daemonic) test worker. The shims replace only process plumbing and device
    choices, never what is written:

    1. the writer forks one process per file and starts a ``multiprocessing.Manager`` for the
       results; a daemonic process may not have children, so the worker is marked non-daemonic for
       the call, and the results queue is a plain in-process ``queue.Queue`` (the synchronous save
       runs the writer function in this process);
    2. ``torch.cuda.synchronize`` (after staging tensors to host memory) is a no-op;
    3. ``torch.cuda.current_device`` (the device of the all-reduced failure flag) answers ``"cpu"``;
    4. the writer logs its memory use through psutil, which megatron-core does not depend on:
       it reads 0 when psutil is missing.
    """
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    config = multiprocessing.current_process()._config
    daemon = config.get("daemon")
    config["daemon"] = False
    try:
        with mock.patch.object(filesystem_async, "_get_write_results_queue", queue.Queue), \
                mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None), \
                mock.patch.object(torch.cuda, "current_device", lambda: "cpu"), \
                mock.patch.object(filesystem_async, "_process_memory", lambda: 0):
            yield
    finally:
        config["daemon"] = daemon
