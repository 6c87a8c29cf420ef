"""Checkpoints: the directory protocol (:mod:`.store`), TP shard metadata (:mod:`.format`), the
training state (:mod:`.training_state`), model-only checkpoints from full tensors
(:mod:`.convert`) and the Hugging Face mapping (:mod:`.hf`)."""
from .store import TRACKER, iteration_dir, read_tracker
from .training_state import load_checkpoint, save_checkpoint

__all__ = ["TRACKER", "iteration_dir", "read_tracker", "load_checkpoint", "save_checkpoint"]
