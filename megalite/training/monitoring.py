"""Observability: TensorBoard and Weights & Biases writers, throughput / MFU / ETA, rank table.

:class:`TrainingMonitor` is what the train loop talks to. On the logging rank (last pipeline
stage, TP/DP/CP rank 0: the rank that prints the log line) it writes per-iteration scalars to
``--tensorboard-dir`` (TensorBoard event files) and to W&B (``--wandb-project``); elsewhere it
writes nothing. It also formats the short progress line printed after the log line::

     tokens per second: 40960.0 | tokens per second per GPU: 10240.0 | MFU: 41.3% | ETA: 0:12:05 |

MFU appears only when the device's dense bf16 peak is known (:data:`PEAK_TFLOPS`, matched on
``torch.cuda.get_device_name``, or ``--peak-tflops``): on a CPU there is no MFU, rather than a
wrong one. Both writers are optional packages imported lazily; a flag that asks for a missing
one fails at start-up (``pretrain_gpt.py``, :func:`missing_monitoring_backends`).
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import math

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched on substrings of the CUDA
# device name, most specific first.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),   # SXM (names: "NVIDIA H100 80GB HBM3", "NVIDIA H100")
    (("H200",), 989.0),   # also GH200
    (("A100",), 312.0),   # SXM and PCIe
]

# Scalars written each iteration (Megatron's TensorBoard names where it has one).
TRAIN_SCALARS = ("lm loss", "learning-rate", "grad-norm", "loss-scale", "batch-size", "iteration-time",
                 "throughput", "tokens-per-sec", "mfu")


def peak_tflops_for(device_name: str | None) -> float | None:
    """Dense bf16 peak of a CUDA device by name, or None when unknown (CPU, other GPUs)."""
    if not device_name:
        return None
    for keys, peak in PEAK_TFLOPS:
        if all(k.lower() in device_name.lower() for k in keys):
            return peak
    return None


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """``--peak-tflops`` if given, else the table's peak for ``device`` (None on CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_monitoring_backends(logging_cfg) -> list[str]:
    """One message per monitoring flag whose package is not installed (checked at start-up by
    ``pretrain_gpt.py``)."""
    errors = []
    if logging_cfg.tensorboard_dir and not _installed("tensorboard"):
        errors.append("--tensorboard-dir needs the tensorboard package, which is not installed: "
                      "pip install tensorboard (or drop --tensorboard-dir)")
    if logging_cfg.wandb_project and not _installed("wandb"):
        errors.append("--wandb-project needs Weights & Biases, which is not installed: "
                      "pip install wandb (or drop --wandb-project)")
    return errors


class TensorBoardWriter:
    """Scalars into TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # lazy: needs the tensorboard package
        self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000, flush_secs=30)

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbWriter:
    """A W&B run; offline (like ``WANDB_MODE=offline``) when wandb finds no API key.

    Offline runs are written under ``save_dir/wandb`` and can be uploaded later with
    ``wandb sync``. W&B itself reads ``WANDB_API_KEY`` / ``~/.netrc`` / ``WANDB_MODE``.
    """

    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict, log=print):
        wandb = importlib.import_module("wandb")
        mode = None if wandb_has_api_key(wandb) else "offline"
        if mode == "offline":
            log(f"wandb: no API key found; logging offline under {save_dir or '.'}/wandb "
                "(upload later with `wandb sync`)")
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config, mode=mode)

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_has_api_key(wandb) -> bool:
    """Whether W&B has credentials (its own lookup: environment, settings, netrc)."""
    try:
        return bool(wandb.api.api_key)
    except Exception:  # noqa: BLE001 - an unknown wandb version: assume no key, go offline
        return False


def memory_scalars(device: torch.device) -> dict[str, float]:
    """Device memory in bytes: CUDA allocator counters, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"mem-allocated-bytes": float(torch.cuda.memory_allocated(device)),
                "mem-max-allocated-bytes": float(torch.cuda.max_memory_allocated(device)),
                "mem-reserved-bytes": float(torch.cuda.memory_reserved(device))}
    try:
        import resource
        return {"mem-max-rss-bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0}
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return {}


# The MoE losses of Trainer.train_step's stats under Megatron-LM's names (log line, TensorBoard).
MOE_LOSS_NAMES = {"moe_aux_loss": "load_balancing_loss", "moe_z_loss": "z_loss"}


def moe_scalars(stats: dict) -> dict[str, float]:
    """MoE figures of an iteration: aux and z loss, and per layer the tokens each expert got and
    the max/mean load imbalance."""
    names = {**MOE_LOSS_NAMES, "moe_load_imbalance": "moe/load-imbalance-max"}
    scalars = {name: stats[key] for key, name in names.items() if key in stats}
    for layer, tokens in stats.get("moe_tokens_per_expert", {}).items():
        mean = sum(tokens) / len(tokens)
        scalars[f"moe/layer-{layer}/load-max-over-mean"] = max(tokens) / mean if mean else 0.0
        scalars.update({f"moe/layer-{layer}/tokens-expert-{e}": t for e, t in enumerate(tokens)})
    return scalars


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (days spelled out past 24 h)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class TrainingMonitor:
    """Per-iteration scalars to the enabled writers, and the progress line (tokens/s, MFU, ETA).

    ``flops_per_iteration`` is the log line's count (with recompute), ``model_flops_per_iteration``
    the model FLOPs without recompute that MFU uses.
    """

    def __init__(self, cfg, *, enabled: bool, world_size: int, flops_per_iteration: float,
                 model_flops_per_iteration: float | None = None, device=torch.device("cpu"), log=print):
        self.cfg, self.enabled, self.world_size, self.device = cfg, enabled, world_size, device
        self.flops = flops_per_iteration
        self.model_flops = model_flops_per_iteration if model_flops_per_iteration is not None else self.flops
        self.tokens_per_iteration = cfg.training.global_batch_size * cfg.model.seq_length
        self.peak_tflops = device_peak_tflops(device, cfg.logging.peak_tflops)
        self.writers = []
        lg = cfg.logging
        if enabled and lg.tensorboard_dir:
            self.writers.append(TensorBoardWriter(lg.tensorboard_dir))
        if enabled and lg.wandb_project:
            self.writers.append(WandbWriter(lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir,
                                            config=_flat_config(cfg), log=log))

    def rates(self, seconds_per_iteration: float) -> dict[str, float]:
        """TFLOP/s/GPU, tokens/s (all GPUs) and MFU (fraction; absent when the peak is unknown)."""
        sec = max(seconds_per_iteration, 1e-12)
        rates = {"throughput": self.flops / (sec * 1e12 * self.world_size),
                 "tokens-per-sec": self.tokens_per_iteration / sec}
        if self.peak_tflops:
            rates["mfu"] = self.model_flops / (sec * 1e12 * self.world_size) / self.peak_tflops
        return rates

    def iteration(self, iteration: int, stats: dict, seconds: float) -> None:
        """Write this iteration's scalars (loss, lr, grad norm, loss scale, throughput, memory)."""
        if not self.writers:
            return
        scalars = {"lm loss": stats["loss"], "learning-rate": stats["lr"], "grad-norm": stats["grad_norm"],
                   "loss-scale": stats.get("loss_scale", 1.0),
                   "batch-size": float(self.cfg.training.global_batch_size), "iteration-time": seconds}
        scalars.update(self.rates(seconds))
        scalars.update(memory_scalars(self.device))
        scalars.update(moe_scalars(stats))
        self._write({k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}, iteration)

    def validation(self, iteration: int, loss: float) -> None:
        if self.writers:
            self._write({"lm loss validation": loss, "lm loss validation ppl": math.exp(min(20.0, loss))},
                        iteration)

    def progress_line(self, iteration: int, seconds_per_iteration: float) -> str:
        """Tokens/s, per-GPU tokens/s, MFU (when the peak is known) and the ETA of the run."""
        rates = self.rates(seconds_per_iteration)
        remaining = (self.cfg.training.train_iters - iteration) * seconds_per_iteration
        line = (f" tokens per second: {rates['tokens-per-sec']:.1f} |"
                f" tokens per second per GPU: {rates['tokens-per-sec'] / self.world_size:.1f} |")
        if "mfu" in rates:
            line += f" MFU: {100.0 * rates['mfu']:.1f}% |"
        return line + f" ETA: {format_eta(remaining)} |"

    def _write(self, scalars: dict[str, float], step: int) -> None:
        for writer in self.writers:
            writer.add_scalars(scalars, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _flat_config(cfg) -> dict:
    """``{"model.hidden_size": 128, ...}`` for the W&B run config."""
    import dataclasses
    out = {"world_size": cfg.world_size}
    for section in ("model", "parallel", "training", "data", "logging"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            out[f"{section}.{key}"] = value
    return out


# -- start-up summary -----------------------------------------------------------------------
def rank_table(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, num_layers: int = 1,
               layers_per_virtual_stage: int | None = None, untied: bool = False, max_rows: int = 64) -> str:
    """Which global rank holds which (tp, pp, dp, cp) coordinates and which layers.

    Built from :func:`megalite.parallel_state.coordinates` and
    :func:`megalite.model.stage_layer_ranges`, the functions the run itself uses.
    """
    from ..model import stage_layer_ranges
    from ..parallel_state import coordinates
    rows = [" rank | tp | pp | dp | cp | layers"]
    for rank in range(min(world_size, max_rows)):
        c = coordinates(rank, world_size, tp=tp, pp=pp, cp=cp)
        ranges = stage_layer_ranges(num_layers, pp, c["pp"], layers_per_virtual_stage)
        layers = ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges)
        extras = []
        if c["pp"] == 0:
            extras.append("embedding")
        if c["pp"] == pp - 1:
            extras.append("output layer" if untied or pp == 1 else "output layer (tied copy)")
        rows.append(f" {rank:4d} | {c['tp']:2d} | {c['pp']:2d} | {c['dp']:2d} | {c['cp']:2d} | {layers}"
                    + (f" + {', '.join(extras)}" if extras else ""))
    if world_size > max_rows:
        rows.append(f" ... ({world_size - max_rows} more ranks)")
    return "\n".join(rows)


def rank_table_for(cfg) -> str:
    """:func:`rank_table` for a validated :class:`~megalite.config.Config`."""
    p = cfg.parallel
    return rank_table(cfg.world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, cfg.model.num_layers, p.num_layers_per_virtual_pipeline_stage,
                      cfg.model.untie_embeddings_and_output_weights)
