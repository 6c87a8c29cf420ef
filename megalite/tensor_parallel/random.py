"""RNG streams for tensor parallelism, and activation checkpointing that replays them.

Dropout must be *different* across TP ranks where activations are sharded (attention
probabilities of different heads, sequence-parallel slices) and *identical* where they are
replicated (the residual stream without SP). The default torch RNG is seeded the same on all
TP ranks; :class:`RNGStatesTracker` holds extra named streams, e.g. ``"model-parallel"``
seeded per TP rank, and ``fork(name)`` runs a block under one of them.
"""
from __future__ import annotations

import contextlib

import torch

MODEL_PARALLEL_RNG = "model-parallel"


def _get_rng_state(device: torch.device | None):
    if device is not None and device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state, device: torch.device | None):
    if device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states for the device that dropout runs on (CPU, or the current CUDA device)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default RNG is left untouched)."""
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_rng_state(self.device)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_rng_state(self.device)
        _set_rng_state(saved, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of every stream's state (uint8 tensors), for checkpoints."""
        return {name: state.clone() for name, state in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with stream ``name`` as the default RNG, then advance and restore."""
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} was never added (call model_parallel_seed first)")
        saved = _get_rng_state(self.device)
        _set_rng_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_rng_state(self.device)
            _set_rng_state(saved, self.device)


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0,
                        device: torch.device | None = None) -> RNGStatesTracker:
    """Seed the default RNG (same on all TP ranks, as Megatron: ``seed + 100 * pp_rank``) and
    return a tracker whose model-parallel stream differs per TP rank (``seed + 2718 + tp_rank``)."""
    torch.manual_seed(seed + 100 * pp_rank)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed + 100 * pp_rank)
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)
    return tracker


class _CheckpointFunction(torch.autograd.Function):
    """Drop the activations of ``function`` in forward and recompute them in backward, with the
    default RNG and the tracker's streams rewound so dropout masks are identical."""

    @staticmethod
    def forward(ctx, function, tracker, device, *args):
        ctx.function, ctx.tracker, ctx.device = function, tracker, device
        ctx.cpu_state = torch.get_rng_state()
        ctx.device_state = _get_rng_state(device) if device is not None and device.type == "cuda" else None
        ctx.tracker_states = tracker.state_dict() if tracker is not None else None
        with torch.no_grad():
            outputs = function(*args)
        ctx.save_for_backward(*[a if torch.is_tensor(a) else None for a in args])
        ctx.non_tensor_args = [None if torch.is_tensor(a) else a for a in args]
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        args = [t if t is not None else o for t, o in zip(saved, ctx.non_tensor_args)]
        inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
        # Recompute under the RNG states of the original forward, then put the current ones back.
        cpu_now = torch.get_rng_state()
        device_now = _get_rng_state(ctx.device) if ctx.device_state is not None else None
        tracker_now = ctx.tracker.state_dict() if ctx.tracker is not None else None
        torch.set_rng_state(ctx.cpu_state)
        if ctx.device_state is not None:
            _set_rng_state(ctx.device_state, ctx.device)
        if ctx.tracker is not None:
            ctx.tracker.load_state_dict(ctx.tracker_states)
        with torch.enable_grad():
            outputs = ctx.function(*inputs)
        torch.set_rng_state(cpu_now)
        if device_now is not None:
            _set_rng_state(device_now, ctx.device)
        if tracker_now is not None:
            ctx.tracker.load_state_dict(tracker_now)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None) + tuple(a.grad if torch.is_tensor(a) else None for a in inputs)


def checkpoint(function, tracker: RNGStatesTracker | None, *args, device: torch.device | None = None):
    """Activation checkpointing of ``function(*args)`` that replays dropout exactly."""
    return _CheckpointFunction.apply(function, tracker, device, *args)
