"""Training: the per-rank step (:mod:`.trainer`), the loop (:mod:`.loop`), data iteration
(:mod:`.batches`), save/stop decisions (:mod:`.stop`), the log line (:mod:`.log_line`) and
TensorBoard / W&B / throughput monitoring (:mod:`.monitoring`)."""
from .batches import BatchIterator
from .loop import check_same_flags_on_all_ranks, pretrain, train
from .trainer import Trainer, loss_step, model_order

__all__ = ["BatchIterator", "Trainer", "check_same_flags_on_all_ranks", "loss_step", "model_order", "pretrain",
           "train"]
