"""Configuration: dataclasses whose fields *are* the command-line flags (one source of truth).

Each field declares its Megatron flag name through :func:`flag`; :func:`build_parser` turns
every field of every dataclass into an argparse option, and :func:`parse_args` returns a
:class:`Config` holding one instance of each, validated against the world size.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .validation import fill_defaults, moe_layer_pattern, validate  # noqa: F401 (re-exported)


def flag(default, help: str, name: str | None = None, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (``--field-name`` unless ``name``)."""
    return field(default=default, metadata={"help": help, "name": name, **argparse_kwargs})


@dataclass
class ModelConfig:
    num_layers: int = flag(4, "number of transformer layers")
    hidden_size: int = flag(128, "transformer hidden size")
    ffn_hidden_size: int | None = flag(None, "MLP hidden size (default 4 x hidden, or the SwiGLU 8/3 rule)")
    num_attention_heads: int = flag(4, "number of attention heads")
    group_query_attention: bool = flag(False, "use grouped-query attention")
    num_query_groups: int | None = flag(None, "number of key/value groups with --group-query-attention")
    seq_length: int = flag(128, "sequence length of a training sample")
    max_position_embeddings: int | None = flag(None, "size of the learned position table (default seq length)")
    position_embedding_type: str = flag("learned_absolute", "position embedding",
                                        choices=["learned_absolute", "rope"])
    rotary_base: int = flag(10000, "RoPE base")
    normalization: str = flag("LayerNorm", "normalisation layer", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = flag(1e-5, "epsilon of LayerNorm / RMSNorm")
    swiglu: bool = flag(False, "SwiGLU MLP instead of GELU")
    openai_gelu: bool = flag(False, "tanh-approximate GELU (OpenAI GPT-2's gelu_new) instead of the exact erf GELU")
    disable_bias_linear: bool = flag(False, "no biases in linear layers")
    untie_embeddings_and_output_weights: bool = flag(False, "separate output layer weights")
    init_method_std: float = flag(0.02, "std of the normal weight initialisation")
    attention_dropout: float = flag(0.0, "dropout on attention probabilities")
    hidden_dropout: float = flag(0.0, "dropout on the residual branches and embeddings")
    make_vocab_size_divisible_by: int = flag(128, "pad the vocabulary to a multiple of this x TP")
    recompute_granularity: str | None = flag(None, "activation recompute", choices=["full", "selective"])
    recompute_method: str | None = flag(None, "which layers to recompute with full", choices=["uniform", "block"])
    recompute_num_layers: int | None = flag(None, "layers per recompute chunk (uniform) or recomputed (block)")
    use_flash_attn: bool = flag(False, "FlashAttention kernels for core attention (CUDA, fp16/bf16; pip install flash-attn)")
    transformer_impl: str = flag("local", "norm/attention kernels: local (torch) or transformer_engine (CUDA)",
                                 choices=["local", "transformer_engine"])
    # Mixture of Experts (megalite/model/moe): dropless top-k routing unless a capacity is set.
    num_experts: int | None = flag(None, "experts per MoE layer (MoE off when unset)")
    moe_ffn_hidden_size: int | None = flag(None, "hidden size of each expert's MLP (default --ffn-hidden-size)")
    moe_layer_freq: str = flag("1", "which layers are MoE: every N-th (an int), or a 0/1 list per layer "
                                    "such as '([0]+[1]*3)*2' or '[0,1,1,1]'")
    moe_router_topk: int = flag(2, "experts per token")
    moe_router_score_function: str = flag("softmax", "router scores", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = flag(False, "softmax over all experts before the top-k (default: after)")
    moe_router_load_balancing_type: str = flag("aux_loss", "load-balancing loss (per micro-batch, or per "
                                               "sequence)", choices=["aux_loss", "seq_aux_loss", "none"])
    moe_aux_loss_coeff: float = flag(0.0, "weight of the load-balancing loss")
    moe_z_loss_coeff: float | None = flag(None, "weight of the router z-loss (ST-MoE)")
    moe_router_enable_expert_bias: bool = flag(False, "aux-loss-free balancing (DeepSeek-V3): a per-expert bias "
                                                      "on the scores for the choice only (sigmoid scores)")
    moe_router_bias_update_rate: float = flag(1e-3, "step of the expert-bias update after each iteration")
    moe_shared_expert_intermediate_size: int | None = flag(None, "hidden size of a shared expert every token "
                                                                 "goes through (off when unset)")
    moe_token_dispatcher_type: str = flag("allgather", "token exchange between expert-parallel ranks",
                                          choices=["allgather", "alltoall"])
    moe_grouped_gemm: bool = flag(False, "run the local experts as one grouped GEMM (CUDA torch._grouped_mm; "
                                         "a loop elsewhere)")
    moe_expert_capacity_factor: float | None = flag(None, "cap each expert at factor x tokens x topk / experts "
                                                          "(drops tokens; layout-dependent; default dropless)")
    moe_token_drop_policy: str = flag("probs", "with a capacity: drop the lowest-probability or the latest "
                                               "tokens", choices=["probs", "position"])
    moe_pad_expert_input_to_capacity: bool = flag(False, "with a capacity: pad each expert's input to it "
                                                         "(static shapes)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = flag(1, "pipeline-parallel size")
    num_layers_per_virtual_pipeline_stage: int | None = flag(None, "layers per virtual stage (interleaved 1F1B)")
    context_parallel_size: int = flag(1, "context-parallel size")
    sequence_parallel: bool = flag(False, "shard norms/dropout along the sequence (needs TP > 1)")
    use_distributed_optimizer: bool = flag(False, "shard optimizer state over data-parallel ranks (ZeRO-1)")
    overlap_grad_reduce: bool = flag(False, "overlap the data-parallel grad reduction with backward")
    ddp_bucket_size: int | None = flag(None, "elements per grad-reduction bucket")
    expert_model_parallel_size: int = flag(1, "expert-parallel size (MoE: experts split over this many ranks)")
    expert_tensor_parallel_size: int | None = flag(None, "tensor-parallel size of each expert (default TP)")
    pipeline_schedule: str = flag("1f1b", "pipeline schedule (gpipe: all forwards, then all backwards; "
                                  "zb-h1: zero-bubble, backward split into input and weight grads)",
                                  choices=["1f1b", "gpipe", "zb-h1"])


@dataclass
class TrainingConfig:
    micro_batch_size: int = flag(4, "samples per micro batch per data-parallel rank")
    global_batch_size: int | None = flag(None, "samples per iteration (default micro batch x DP)")
    train_iters: int = flag(200, "training iterations")
    lr: float = flag(1e-3, "peak learning rate")
    min_lr: float = flag(0.0, "learning rate floor after decay")
    lr_decay_style: str = flag("cosine", "decay shape", choices=["constant", "linear", "cosine", "WSD"])
    lr_warmup_iters: int = flag(0, "linear warmup iterations")
    lr_decay_iters: int | None = flag(None, "iterations over which to decay (default train iters)")
    lr_wsd_decay_iters: int | None = flag(None, "WSD: iterations of the final decay (default 10%% of decay iters)")
    lr_wsd_decay_style: str = flag("exponential", "WSD: shape of the final decay (as Megatron-LM)",
                                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    weight_decay: float = flag(0.01, "AdamW weight decay (not applied to biases and norms)")
    clip_grad: float = flag(1.0, "global grad-norm clipping threshold (0 disables)")
    adam_beta1: float = flag(0.9, "Adam beta1")
    adam_beta2: float = flag(0.999, "Adam beta2")
    adam_eps: float = flag(1e-8, "Adam epsilon")
    bf16: bool = flag(False, "bf16 parameters with fp32 main weights")
    fp16: bool = flag(False, "fp16 parameters with dynamic loss scaling")
    loss_scale: float | None = flag(None, "static loss scale for fp16 (default dynamic)")
    initial_loss_scale: float = flag(2.0 ** 32, "initial dynamic loss scale")
    seed: int = flag(1234, "random seed")
    device: str = flag("auto", "where each process trains: cuda (one GPU per process, cuda:LOCAL_RANK), cpu, or auto "
                               "(CUDA when every process on the node has a GPU of its own, the CPU when there is none)",
                       choices=["auto", "cuda", "cpu"])
    max_consecutive_nan_iterations: int = flag(
        5, "stop (exit code 1) after this many iterations in a row with non-finite gradients; "
           "their updates are skipped")


@dataclass
class DataConfig:
    data_path: list[str] | None = flag(None, "dataset prefix, or weight prefix pairs to blend", nargs="+")
    split: str = flag("969,30,1", "train,valid,test proportions (by documents)")
    mock_data: bool = flag(False, "deterministic synthetic tokens")
    tokenizer_type: str | None = flag(None, "tokenizer", choices=[
        "GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "NullTokenizer", "ByteTokenizer"])
    tokenizer_model: str | None = flag(None, "sentencepiece model, or HF tokenizer.json / directory")
    vocab_file: str | None = flag(None, "GPT-2 BPE vocab.json")
    merge_file: str | None = flag(None, "GPT-2 BPE merges.txt")
    vocab_size: int | None = flag(None, "vocabulary size (NullTokenizer, mock data)")
    data_cache_path: str | None = flag(None, "where dataset indices and the built-in corpus are cached")
    reset_position_ids: bool = flag(False, "packed documents: positions restart after each end-of-document token")
    reset_attention_mask: bool = flag(False, "packed documents: attend only within the same document "
                                             "(documents end at the end-of-document token)")
    eod_mask_loss: bool = flag(False, "packed documents: no loss where the input token is end-of-document")


@dataclass
class LoggingConfig:
    log_interval: int = flag(10, "iterations between log lines")
    eval_interval: int = flag(100, "iterations between validation runs")
    eval_iters: int = flag(10, "validation iterations per run")
    save: str | None = flag(None, "checkpoint directory to write")
    load: str | None = flag(None, "checkpoint directory to resume from")
    save_interval: int | None = flag(None, "iterations between checkpoints")
    exit_interval: int | None = flag(None, "stop after an iteration divisible by this")
    exit_signal_handler: bool = flag(False, "on SIGTERM, save a checkpoint after the current iteration and exit")
    keep_last: int | None = flag(None, "keep only the newest K checkpoints under --save")
    async_save: bool = flag(False, "write checkpoints in the background while training goes on (committed once "
                                   "every rank's files are written; at most one save in flight)")
    finetune: bool = flag(False, "load only the model weights from --load; start at iteration 0")
    no_load_optim: bool = flag(False, "do not load the optimizer state from --load")
    no_load_rng: bool = flag(False, "do not load the RNG states from --load")
    inject_fault_at_iteration: int | None = flag(None, "testing: kill --inject-fault-rank after this iteration")
    inject_fault_rank: int = flag(0, "testing: the rank --inject-fault-at-iteration kills")
    tensorboard_dir: str | None = flag(None, "write TensorBoard events here")
    wandb_project: str | None = flag(None, "Weights & Biases project")
    wandb_exp_name: str | None = flag(None, "Weights & Biases run name")
    wandb_save_dir: str | None = flag(None, "directory for the W&B run files (offline runs: sync later)")
    peak_tflops: float | None = flag(None, "device peak TFLOP/s for MFU (default: known GPUs' dense bf16 peak; none on CPU)")
    timeline_file: str | None = flag(None, "record per-rank pipeline timeline events (JSON) here")


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "training": TrainingConfig,
            "data": DataConfig, "logging": LoggingConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                   * p.context_parallel_size)

    @property
    def virtual_pipeline_size(self) -> int | None:
        """Model chunks per pipeline rank with --num-layers-per-virtual-pipeline-stage, else None."""
        p = self.parallel
        if not p.num_layers_per_virtual_pipeline_stage:
            return None
        return self.model.num_layers // p.pipeline_model_parallel_size // p.num_layers_per_virtual_pipeline_stage

    @property
    def num_microbatches(self) -> int:
        return self.training.global_batch_size // (self.training.micro_batch_size * self.data_parallel_size)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("name") or "--" + f.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per config field, grouped by section."""
    parser = argparse.ArgumentParser(description="megalite GPT pretraining (Megatron-LM flag names)",
                                     allow_abbrev=False)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            extra = {k: v for k, v in f.metadata.items() if k not in ("help", "name")}
            if f.type in (bool, "bool"):
                group.add_argument(_flag_name(f), dest=f.name, action="store_true", help=f.metadata["help"])
                continue
            kind = str(f.type)
            typ = int if "int" in kind else float if "float" in kind else str
            group.add_argument(_flag_name(f), dest=f.name, type=typ, default=f.default,
                               help=f.metadata["help"] + f" (default: {f.default})", **extra)
    return parser


def parse_args(argv: list[str] | None = None, world_size: int = 1) -> Config:
    """Parse Megatron-style flags into a validated :class:`Config`.

    Unknown flags and inconsistent combinations exit with one message naming the flags.
    """
    parser = build_parser()
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    cfg = Config(world_size=world_size, **{
        section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
        for section, cls in SECTIONS.items()})
    try:
        validate(cfg)
    except ValueError as e:  # one line naming the flags at fault, without the long usage text
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return cfg
