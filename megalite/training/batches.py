"""A data-parallel rank's micro-batches, in Megatron's sampler order."""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data.samplers import MegatronPretrainingSampler
from ..model.context_parallel import get_batch_on_this_cp_rank
from ..parallel_state import ParallelState


class BatchIterator:
    """This DP rank's micro-batches from ``dataset``, in Megatron's sampler order.

    Every TP/PP rank of a DP rank reads the same samples itself (the datasets are
    deterministic), so no broadcast is needed. Its position is ``consumed_samples`` (global,
    over all DP ranks; :meth:`state_dict` / :meth:`load_state_dict`). With ``cycle`` (the
    validation data, read again and again) it starts over at the end of the dataset.
    """

    def __init__(self, dataset, cfg: Config, pstate: ParallelState, consumed_samples: int = 0,
                 device=torch.device("cpu"), cycle: bool = False):
        self.dataset, self.cfg, self.pstate, self.device, self.cycle = dataset, cfg, pstate, device, cycle
        self.load_state_dict({"consumed_samples": consumed_samples})

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``consumed_samples`` samples."""
        self.consumed_samples = state["consumed_samples"]
        start = self.consumed_samples % len(self.dataset) if self.cycle else self.consumed_samples
        self.sampler = MegatronPretrainingSampler(len(self.dataset), start, self.cfg.training.micro_batch_size,
                                                  self.pstate.dp_rank, self.pstate.dp_size)
        self.indices = iter(self.sampler)

    def next_microbatches(self, count: int) -> list[dict]:
        """``count`` micro-batches of ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (and
        ``document_ids`` with ``--reset-attention-mask``)."""
        batches = []
        for _ in range(count):
            try:
                idx = next(self.indices)
            except StopIteration:
                raise RuntimeError(f"the dataset ran out of samples ({len(self.dataset)}); "
                                   "lower --train-iters / --eval-iters or use more data") from None
            batches.append(self._collate([self.dataset[i] for i in idx]))
        self.consumed_samples += count * self.cfg.training.micro_batch_size * self.pstate.dp_size
        return batches

    def _collate(self, items: list) -> dict:
        # A sample is seq_length + 1 token ids, or a dict {"tokens": those ids, "loss_mask":
        # seq_length weights of the labels} for data that excludes some tokens from the loss,
        # with, for packed documents, the seq_length "position_ids" / "document_ids" of the inputs.
        masked = isinstance(items[0], dict)
        samples = torch.from_numpy(np.stack([x["tokens"] if masked else x for x in items]).astype(np.int64))
        samples = samples.to(self.device)
        tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
        mask = (torch.from_numpy(np.stack([x["loss_mask"] for x in items]).astype(np.float32)).to(self.device)
                if masked else torch.ones_like(labels, dtype=torch.float32))
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask}
        for key in ("position_ids", "document_ids"):
            if masked and key in items[0]:
                batch[key] = torch.from_numpy(np.stack([x[key] for x in items]).astype(np.int64)).to(self.device)
        # Context parallel: keep this CP rank's (load-balanced) chunks, with global position ids.
        return get_batch_on_this_cp_rank(batch, self.pstate.cp_rank, self.pstate.cp_size)
