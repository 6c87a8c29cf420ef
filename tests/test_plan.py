"""The planner's numbers against the real model, optimizer and schedule on CPU.

Parameters per rank and optimizer state are predicted exactly; activations are compared with
the bytes autograd saves for backward (deduplicated by storage), per micro-batch and as the
peak over a whole training step (pipeline in-flight micro-batches and recompute included).
"""
import weakref

import pytest
import torch

from distributed_helper import run_distributed
from megalite import planning
from megalite.config import parse_args
from megalite.model import stage_layer_ranges
from megalite.model.gpt import GPTModel
from megalite.parallel_state import ParallelState

VOCAB = 200
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", str(VOCAB), "--train-iters", "2",
        "--eval-interval", "0"]
CPU = planning.Hardware(device="cpu")
LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"]


class _Saved:
    __slots__ = ("tensor", "__weakref__")


class SavedBytes:
    """Bytes of tensors autograd holds for backward, by storage (each storage counted once):
    ``current`` and ``peak``. Parameters are excluded."""

    def __init__(self, params):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return t
        handle = _Saved()
        handle.tensor = t
        entry = self.live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[ptr]

    @staticmethod
    def unpack(handle):
        return handle.tensor if isinstance(handle, _Saved) else handle

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def build_stage(cfg, pp_rank: int) -> list[GPTModel]:
    """The model chunks of pipeline rank ``pp_rank``, built in one process (TP = 1)."""
    p = cfg.parallel
    ranges = stage_layer_ranges(cfg.model.num_layers, p.pipeline_model_parallel_size, pp_rank,
                                p.num_layers_per_virtual_pipeline_stage)
    last = p.pipeline_model_parallel_size - 1
    return [GPTModel(cfg.model, ParallelState.from_sizes(), vocab_size=VOCAB,
                     pre_process=pp_rank == 0 and v == 0, post_process=pp_rank == last and v == len(ranges) - 1,
                     layer_start=start, layer_end=end)
            for v, (start, end) in enumerate(ranges)]


@pytest.mark.parametrize("extra,world", [
    ([], 1),
    (LLAMA, 1),
    (["--untie-embeddings-and-output-weights"], 1),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"], 2),                       # tied copy
    (LLAMA + ["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--global-batch-size", "8"], 4),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2",
      "--global-batch-size", "4", "--micro-batch-size", "1", "--max-position-embeddings", "100"], 2),
], ids=["gpt", "llama", "untied", "pp2-tied", "llama-pp4", "pp2-virtual"])
def test_parameters_per_stage_are_exact(extra, world):
    cfg = parse_args(TINY + extra, world_size=world)
    for rank in range(cfg.parallel.pipeline_model_parallel_size):
        chunks = build_stage(cfg, rank)
        predicted = planning.stage_params(cfg, VOCAB, rank)
        assert predicted["total"] == sum(p.numel() for c in chunks for p in c.parameters()), f"stage {rank}"
        embedding = sum(c.word_embeddings.weight.numel() for c in chunks
                        if c.pre_process and hasattr(c, "word_embeddings"))
        assert predicted["embedding"] == embedding
    whole = GPTModel(cfg.model, ParallelState.from_sizes(), vocab_size=VOCAB)
    assert planning.total_params(cfg, VOCAB) == sum(p.numel() for p in whole.parameters())


def test_gpt2_small_parameter_count():
    """GPT-2 124M: 124,439,808 parameters with the 50,257-token vocabulary, plus 47 padded rows."""
    cfg = parse_args(["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
                      "--seq-length", "1024", "--vocab-size", "50257"])
    assert planning.padded_vocab(cfg, 50257) == 50304
    assert planning.total_params(cfg, 50257) == 124_439_808 + 47 * 768


def _trainer_step(cfg, pstate):
    """One training step of a real Trainer; returns its measurements."""
    from megalite.data.build import build_datasets
    from megalite.training import BatchIterator, Trainer
    datasets, vocab = build_datasets(cfg, log=lambda m: None)
    trainer = Trainer(cfg, pstate, vocab)
    batches = BatchIterator(datasets[0], cfg, pstate)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    with SavedBytes(params) as saved:
        trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    adam = trainer.optimizer.optimizer  # the torch optimizer over the fp32 main params / shards
    main = [p for group in adam.param_groups for p in group["params"]]
    half = params[0].dtype != torch.float32
    return {"pp_rank": pstate.pp_rank, "params": sum(p.numel() for p in params),
            "weights": sum(p.numel() * p.element_size() for p in params),
            # the fp32 grad buffer (every param's main_grad view; the optimizer may own a shard)
            "grads": sum(g.numel() * g.element_size() for g in (getattr(p, "main_grad", p.grad) for p in params)),
            "main_params": sum(p.numel() * p.element_size() for p in main) if half else 0,
            "optimizer": sum(t.numel() * t.element_size() for state in adam.state.values()
                             for t in state.values() if torch.is_tensor(t) and t.dim() > 0),
            "activation_peak": saved.peak}


def _distributed_step(rank, world, argv):
    cfg = parse_args(argv, world_size=world)
    p = cfg.parallel
    pstate = ParallelState.from_config(cfg)
    torch.manual_seed(0)
    return _trainer_step(cfg, pstate)


def _check_step(cfg, measured: dict, rel: float | None = 0.02):
    rank = measured["pp_rank"]
    params = planning.stage_params(cfg, VOCAB, rank)["total"]
    state = planning.state_bytes(params, cfg, planning.stage_expert_params(cfg, rank))
    assert measured["params"] == params
    for key in ("weights", "grads", "main_params", "optimizer"):
        assert measured[key] == state[key], f"stage {rank}: {key}"
    if rel is None:  # (activations of MoE layers are not modelled)
        return
    predicted = planning.stage_activations(cfg, CPU, VOCAB, rank)["peak"]
    assert predicted == pytest.approx(measured["activation_peak"], rel=rel), f"stage {rank} activation peak"


@pytest.mark.parametrize("extra", [
    ["--global-batch-size", "4"],                                # 2 micro-batches, accumulated
    ["--bf16"],
    LLAMA + ["--bf16", "--hidden-dropout", "0.1"],
    ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"],   # CPU SDPA falls back to the math path
    ["--recompute-granularity", "selective"],
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--num-layers", "4"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
     "--num-layers", "3"],
], ids=["fp32", "bf16", "llama-bf16-dropout", "attention-dropout", "selective", "full-uniform", "full-block"])
def test_state_bytes_and_activation_peak_single_process(extra):
    cfg = parse_args(TINY + extra)
    torch.manual_seed(0)
    measured = _trainer_step(cfg, ParallelState.from_sizes())
    _check_step(cfg, measured)
    bytes_per_param = (measured["weights"] + measured["grads"] + measured["main_params"]
                       + measured["optimizer"]) / measured["params"]
    assert bytes_per_param == planning.bytes_per_param(cfg) == (18 if cfg.training.bf16 else 16)


def test_activations_per_microbatch_by_stage():
    """A first, middle and last stage in isolation: one forward's saved bytes."""
    cfg = parse_args(TINY + ["--num-layers", "3", "--pipeline-model-parallel-size", "3"], world_size=3)
    s, b, h = 64, 2, 64
    for rank in range(3):
        (chunk,) = build_stage(cfg, rank)
        tokens = torch.randint(0, VOCAB, (b, s))
        if rank > 0:
            chunk.set_input_tensor(torch.randn(s, b, h, requires_grad=True))
        with SavedBytes(chunk.parameters()) as saved:
            output = chunk(tokens, labels=tokens if rank == 2 else None)
        predicted = planning.stage_activations(cfg, CPU, VOCAB, rank)["per_microbatch"]
        assert predicted == pytest.approx(saved.current, rel=0.01), f"stage {rank}"
        del output


def test_pipeline_in_flight_microbatches_and_tied_copy():
    """1F1B on 2 stages with 4 micro-batches: stage 0 holds 2 micro-batches at its peak, the
    last stage 1 (plus its logits); the last stage holds the tied embedding copy."""
    argv = TINY + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--micro-batch-size", "1"]
    cfg = parse_args(argv, world_size=2)
    assert [planning.in_flight_microbatches(cfg, r) for r in (0, 1)] == [2, 1]
    results = run_distributed(_distributed_step, 2, argv, timeout=120)
    for measured in results:
        _check_step(cfg, measured)


def test_tensor_sequence_parallel_with_distributed_optimizer():
    """TP=2 with SP and DP=2 with the distributed optimizer: shards of params, Adam state
    (ceil(P / DP) elements per rank) and activations (s/t under SP)."""
    argv = TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
                   "--global-batch-size", "4"]
    cfg = parse_args(argv, world_size=4)
    results = run_distributed(_distributed_step, 4, argv, timeout=120)
    for measured in results:
        _check_step(cfg, measured)
    assert results[0]["optimizer"] == 8 * -(-results[0]["params"] // 2)


def test_relation_to_korthikanti():
    """On GPU kernels (fused attention, 1-byte masks, 16-bit activations) with dropout and the
    paper's GPT layer, megalite keeps the paper's sbh(34/t) (SP) or sbh(10 + 24/t) (no SP)
    per layer, up to the norms' statistics and the attention's log-sum-exp; the paper's
    5as/h (materialised scores) is what selective recompute or fused attention removes."""
    gpu = planning.Hardware(device="cuda")
    for extra in (["--tensor-model-parallel-size", "1"], ["--tensor-model-parallel-size", "4"],
                  ["--tensor-model-parallel-size", "4", "--sequence-parallel"]):
        cfg = parse_args(["--num-layers", "4", "--hidden-size", "1024", "--num-attention-heads", "16",
                          "--seq-length", "2048", "--micro-batch-size", "1", "--bf16", "--hidden-dropout", "0.1",
                          "--attention-dropout", "0.1"] + extra, world_size=4)
        ours = planning.layer_activation_bytes(cfg, gpu)
        paper = planning.korthikanti_layer_bytes(cfg, recompute="selective")
        assert ours == pytest.approx(paper, rel=0.01)
        assert ours >= paper
        s, b, h, a, t = 2048, 1, 1024, 16, cfg.parallel.tensor_model_parallel_size
        assert planning.korthikanti_layer_bytes(cfg) - paper == pytest.approx(5 * a * s * s * b / t)
        full = parse_args(["--num-layers", "4", "--hidden-size", "1024", "--num-attention-heads", "16",
                           "--seq-length", "2048", "--micro-batch-size", "1", "--bf16",
                           "--recompute-granularity", "full", "--recompute-method", "uniform"] + extra, world_size=4)
        assert planning.layer_activation_bytes(full, gpu) == planning.korthikanti_layer_bytes(full) \
            == 2 * s * b * h / (t if full.parallel.sequence_parallel else 1)


def test_search_ranks_fitting_layouts():
    """A 1.3B-parameter model on 8 x 16 GiB: layouts that fit, fastest first, all valid."""
    argv = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
            "--micro-batch-size", "1", "--global-batch-size", "64", "--bf16", "--vocab-size", "50257"]
    cfg = parse_args(argv, world_size=8)
    hw = planning.Hardware(device_memory_gb=16)
    plans = planning.search(cfg, 50257, hw)
    assert plans and all(pl.fits for pl in plans)
    times = [pl.times["total"] for pl in plans]
    assert times == sorted(times)
    layouts = {(pl.cfg.parallel.tensor_model_parallel_size, pl.cfg.parallel.pipeline_model_parallel_size,
                pl.cfg.parallel.use_distributed_optimizer, pl.cfg.model.recompute_granularity) for pl in plans}
    assert (1, 1, False, None) not in layouts  # 1.3B x 18 B/param = 24 GiB: DP alone cannot fit
    everything = planning.search(cfg, 50257, hw, include_unfit=True)
    assert len(everything) > len(plans) and not everything[-1].fits
    single = planning.plan(cfg, 50257, hw)
    assert single.stages[0]["state"]["total"] == pytest.approx(18 * single.total_params, rel=1e-9)
    assert not single.fits
    # The bubble and pipeline communication appear only with PP > 1.
    pp = [pl for pl in plans if pl.cfg.parallel.pipeline_model_parallel_size == 2][0]
    assert pp.bubble == pytest.approx(1 / pp.cfg.num_microbatches)
    assert pp.times["pp"] > 0 and single.times["pp"] == 0 and single.bubble == 0


def test_plan_cli(capsys):
    from tools.plan import main
    assert main(["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12", "--seq-length", "1024",
                 "--micro-batch-size", "4", "--global-batch-size", "32", "--bf16", "--vocab-size", "50257",
                 "--world-size", "8", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--use-distributed-optimizer"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 124,475,904" not in out  # padded for TP=2: 50432 rows
    assert f"parameters: {124_439_808 + (50432 - 50257) * 768:,}" in out
    assert "bytes per parameter: 9.00" in out     # 6 + 12/DP, DP = 8 / TP 2 = 4
    assert "fits: yes" in out
    assert main(["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
                 "--micro-batch-size", "1", "--global-batch-size", "64", "--bf16", "--vocab-size", "50257",
                 "--world-size", "8", "--device-memory-gb", "16", "--search", "--top", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3


def test_plan_cli_defaults_world_size_to_the_model_parallel_layout(capsys):
    """Without --world-size a TP2 x PP2 layout plans on TP x PP x CP = 4 ranks (one replica,
    DP 1), and says so in one line; an explicit --world-size prints no such line."""
    from tools.plan import main
    argv = TINY + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "world size not given" in line]
    assert notes == ["world size not given (--world-size): using TP 2 x PP 2 x CP 1 = 4 ranks"]
    assert "layout: world 4 = TP 2 x PP 2 x CP 1 x DP 1;" in out
    assert main(argv + ["--world-size", "4"]) == 0
    explicit = capsys.readouterr().out
    assert "world size not given" not in explicit
    assert explicit == out.replace(notes[0] + "\n", "")


MOE_PLAN = ["--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2", "--moe-layer-freq", "2",
            "--moe-shared-expert-intermediate-size", "32"]


def test_moe_parameters_total_active_and_per_expert_rank():
    """Every parameter of an MoE model (router, experts, shared expert, dense layers between) is
    counted; one token runs only top-k of the experts; an EP rank holds its share of them."""
    import dataclasses
    cfg = parse_args(TINY + MOE_PLAN)
    whole = GPTModel(cfg.model, ParallelState.from_sizes(ep=1), vocab_size=VOCAB)
    total = sum(p.numel() for p in whole.parameters())
    assert planning.total_params(cfg, VOCAB) == total
    expert = sum(p.numel() for p in whole.layers[0].mlp.experts[0].parameters())
    moe_layers = sum(1 for layer in whole.layers if hasattr(layer.mlp, "router"))
    assert moe_layers == cfg.model.num_layers // 2 and expert == 2 * 48 * cfg.model.hidden_size  # GELU: fc1 + fc2, no bias
    assert planning.active_params(cfg, VOCAB) == total - moe_layers * (4 - 2) * expert
    ep2 = parse_args(TINY + MOE_PLAN + ["--expert-model-parallel-size", "2"], world_size=2)
    rank = dataclasses.replace(ParallelState.from_sizes(ep=1), ep_size=2, ep_rank=1)
    half = GPTModel(ep2.model, rank, vocab_size=VOCAB)
    assert planning.stage_params(ep2, VOCAB, 0)["total"] == sum(p.numel() for p in half.parameters()) == \
        total - moe_layers * 2 * expert
    dense = parse_args(TINY)
    assert planning.active_params(dense, VOCAB) == planning.total_params(dense, VOCAB)


def test_moe_optimizer_state_shards_experts_over_expert_data_parallel():
    """EP2 on 4 ranks with the distributed optimizer: dense state over DP 4, expert state over
    EDP 2 (each expert shard has 2 replicas), exactly as measured on the real optimizer."""
    argv = TINY + MOE_PLAN + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                              "--global-batch-size", "4", "--micro-batch-size", "1"]
    cfg = parse_args(argv, world_size=4)
    expert = planning.stage_expert_params(cfg, 0)
    assert expert == 4 // 2 * 2 * 48 * cfg.model.hidden_size  # 1 MoE layer (freq 2 of 2), 2 local experts
    for measured in run_distributed(_distributed_step, 4, argv, timeout=120):
        _check_step(cfg, measured, rel=None)
        dense = measured["params"] - expert
        assert measured["optimizer"] == 8 * (-(-dense // 4) + expert // 2)
