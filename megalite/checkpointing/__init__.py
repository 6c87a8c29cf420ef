"""Checkpoints: the directory protocol (:mod:`.store`), the sharded format (:mod:`.sharded`; the
older one is read by :mod:`.legacy`), TP shard metadata (:mod:`.format`), saving and loading a
trainer (:mod:`.training_state`) and model-only checkpoints from full tensors (:mod:`.convert`,
what the converters of :mod:`megalite.interop` read and write)."""
from .store import TRACKER, iteration_dir, read_tracker
from .training_state import Checkpointer, load_checkpoint, save_checkpoint

__all__ = ["TRACKER", "Checkpointer", "iteration_dir", "read_tracker", "load_checkpoint", "save_checkpoint"]
