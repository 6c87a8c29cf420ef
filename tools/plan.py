"""Plan a run before launching it: parameters, memory, communication and step time per rank.

    python tools/plan.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \
        --seq-length 2048 --micro-batch-size 2 --global-batch-size 512 --bf16 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
        --use-distributed-optimizer --vocab-size 50257 --world-size 16 --device-memory-gb 80

    python tools/plan.py ... --world-size 64 --search       # rank the layouts that fit

Model, parallel and training flags are pretrain_gpt.py's (megalite.config's parser); the
numbers come from the megalite.planning package (see docs/performance.md, "Planner").
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite import planning  # noqa: E402
from megalite.config import SECTIONS, Config, build_parser, validate  # noqa: E402
from megalite.data.build import BYTE_VOCAB_SIZE, MOCK_VOCAB_SIZE  # noqa: E402

GPT2_VOCAB_SIZE = 50257


def build_plan_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.description = "megalite planner: memory, communication and step time of a layout"
    g = parser.add_argument_group("planner")
    g.add_argument("--world-size", "--nproc", dest="world_size", type=int, default=None,
                   help="number of ranks (GPUs) in the job (default: TP x PP x CP, i.e. no data parallelism)")
    g.add_argument("--device-memory-gb", type=float, default=80.0, help="memory per device in GiB (default: 80)")
    g.add_argument("--search", action="store_true", help="list the layouts that fit, fastest first")
    g.add_argument("--top", type=int, default=10, help="layouts listed by --search (default: 10)")
    g.add_argument("--efficiency", type=float, default=0.5,
                   help="achieved fraction of --peak-tflops in the matmuls (default: 0.5)")
    g.add_argument("--intra-node-bandwidth", type=float, default=200.0,
                   help="GB/s per device inside a node, NVLink (default: 200)")
    g.add_argument("--inter-node-bandwidth", type=float, default=25.0,
                   help="GB/s per device across nodes (default: 25)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default: 8)")
    g.add_argument("--planner-device", choices=["cuda", "cpu"], default="cuda",
                   help="kernels the activation estimate assumes (cpu: megalite's CPU runs)")
    return parser


def parse(argv=None) -> tuple[Config, planning.Hardware, argparse.Namespace]:
    parser = build_plan_parser()
    ns = parser.parse_args(argv)
    values = vars(ns)
    world_size = default_world_size(ns) if ns.world_size is None else ns.world_size
    cfg = Config(world_size=world_size, **{
        section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for section, cls in SECTIONS.items()})
    try:
        validate(cfg)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    hw = planning.Hardware(device_memory_gb=ns.device_memory_gb, peak_tflops=cfg.logging.peak_tflops or 989.0,
                           efficiency=ns.efficiency, intra_node_gbps=ns.intra_node_bandwidth,
                           inter_node_gbps=ns.inter_node_bandwidth, gpus_per_node=ns.gpus_per_node,
                           device=ns.planner_device)
    return cfg, hw, ns


def default_world_size(ns: argparse.Namespace) -> int:
    """Without --world-size: one model replica, TP x PP x CP ranks (no data parallelism)."""
    return ns.tensor_model_parallel_size * ns.pipeline_model_parallel_size * ns.context_parallel_size


def default_world_size_line(cfg: Config) -> str:
    p, n = cfg.parallel, cfg.world_size
    return (f"world size not given (--world-size): using TP {p.tensor_model_parallel_size} x "
            f"PP {p.pipeline_model_parallel_size} x CP {p.context_parallel_size} = {n} rank{'s' if n > 1 else ''}")


def vocab_size_of(cfg: Config) -> int:
    """The real vocabulary the run would have (before padding)."""
    d = cfg.data
    if d.mock_data:
        return d.vocab_size or MOCK_VOCAB_SIZE
    if d.tokenizer_type == "NullTokenizer" and d.vocab_size:
        return d.vocab_size + 1
    if d.vocab_size:
        return d.vocab_size
    if d.tokenizer_type in (None, "ByteTokenizer"):
        return BYTE_VOCAB_SIZE
    if d.tokenizer_type == "GPT2BPETokenizer":
        return GPT2_VOCAB_SIZE
    raise SystemExit(f"plan.py: give --vocab-size for --tokenizer-type {d.tokenizer_type}")


def gib(x: float) -> str:
    return f"{x / planning.GiB:.2f}"


def mib(x: float) -> str:
    return f"{x / 2 ** 20:.2f}"


def human(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def layout_line(cfg: Config) -> str:
    p, m, t = cfg.parallel, cfg.model, cfg.training
    vpp = f" x VPP {planning.model_chunks(cfg)}" if planning.model_chunks(cfg) > 1 else ""
    dtype = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    recompute = m.recompute_granularity or "none"
    if recompute == "full":
        recompute += f" ({m.recompute_method}, {m.recompute_num_layers or 1})"
    return (f"world {cfg.world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}{vpp}"
            f" x CP {p.context_parallel_size} x DP {cfg.data_parallel_size}; {dtype}; "
            f"SP {'on' if p.sequence_parallel else 'off'}; distributed optimizer "
            f"{'on' if p.use_distributed_optimizer else 'off'}; recompute {recompute}; "
            f"{cfg.num_microbatches} micro-batches of {t.micro_batch_size} per DP rank")


def format_plan(pl: planning.Plan) -> str:
    cfg, m = pl.cfg, pl.cfg.model
    lines = [f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
             f"(query groups {m.num_query_groups}), ffn {m.ffn_hidden_size}{' SwiGLU' if m.swiglu else ''}, "
             f"seq {m.seq_length}, vocab {pl.vocab_size} (padded {pl.padded_vocab_size})",
             f"parameters: {pl.total_params:,} ({human(pl.total_params).replace('G', 'B')})"
             + (f", active per token {pl.active_params:,} ({human(pl.active_params).replace('G', 'B')}; "
                f"{m.moe_router_topk} of {m.num_experts} experts)" if m.num_experts else ""),
             "layout: " + layout_line(cfg),
             "",
             "parameters per rank (one TP shard):",
             " stage |     embedding |        layers | final norm + output |         total"]
    for st in pl.stages:
        pr = st["params"]
        lines.append(f" {st['pp_rank']:5d} | {pr['embedding'] + pr['position_embedding']:13,d} | {pr['layers']:13,d}"
                     f" | {pr['final_norm'] + pr['output_layer']:19,d} | {pr['total']:13,d}")
    small = pl.peak_memory < planning.GiB  # tiny (CPU) models: MiB
    mem, unit = (mib, "MiB") if small else (gib, "GiB")
    lines += ["", f"bytes per parameter: {planning.bytes_per_param(cfg):.2f} (Megatron's table; "
              "bf16: 2 param + 4 grad + (4 main + 8 Adam)/DP-if-distributed; fp32: 4 + 4 + 8/DP-if-distributed)",
              f"memory per rank ({unit}), device {gib(pl.device_memory)} GiB:",
              " stage | weights |   grads | main params | optimizer | activations (micro-batches) |   total | fits"]
    for st in pl.stages:
        sb, act = st["state"], st["activations"]
        lines.append(f" {st['pp_rank']:5d} | {mem(sb['weights']):>7} | {mem(sb['grads']):>7} "
                     f"| {mem(sb['main_params']):>11}"
                     f" | {mem(sb['optimizer']):>9} | {mem(act['peak']):>15} ({act['in_flight']:3d})       "
                     f"| {mem(st['memory']):>7} | {'yes' if st['memory'] <= pl.device_memory else 'NO'}")
    first = pl.stages[0]["activations"]
    lines += [f"activations per micro-batch on stage 0: {mem(first['per_microbatch'])} {unit}"
              + (f"; full-recompute working set {mem(first['recompute_working_set'])} {unit}"
                 if first["recompute_working_set"] else "")
              + f"; Korthikanti et al.'s formula (materialised attention scores): "
              f"{mem(first['korthikanti'])} {unit}",
              "", f"pipeline bubble: (p - 1) / (v m) = {100 * pl.bubble:.1f}% of the ideal compute time",
              "communication per step (worst rank):"]
    for group in ("tp", "pp", "dp", "embedding"):
        entries = [st["communication"][group] for st in pl.stages if group in st["communication"]]
        if entries:
            e = max(entries, key=lambda x: x["traffic"])
            lines.append(f"  {group:9s} {e['ops']:6d} collectives/sends, payload {gib(e['payload'])} GiB, "
                         f"traffic {gib(e['traffic'])} GiB, {1000 * e['seconds']:.1f} ms")
    tm = pl.times
    lines += ["", f"estimated step time: {1000 * tm['total']:.1f} ms = compute {1000 * tm['compute']:.1f} "
              f"+ bubble {1000 * tm['bubble']:.1f} + TP {1000 * tm['tp']:.1f} + PP {1000 * tm['pp']:.1f} "
              f"+ DP {1000 * tm['dp']:.1f} + embedding {1000 * tm['embedding']:.1f} ms "
              f"({human(tm['flops'])} FLOP per step)",
              f"tokens per second: {cfg.training.global_batch_size * m.seq_length / tm['total']:,.0f}",
              f"fits: {'yes' if pl.fits else 'NO'} (peak {gib(pl.peak_memory)} of {gib(pl.device_memory)} GiB; "
              "add ~1-3 GiB for the CUDA context and allocator fragmentation)"]
    return "\n".join(lines)


def format_search(plans: list[planning.Plan], top: int) -> str:
    if not plans:
        return "no layout fits: more devices, smaller micro-batches, or recompute are needed"
    rows = [" rank |  TP |  PP |  DP | dist opt | recompute | peak GiB | step ms | tokens/s",
            "------+-----+-----+-----+----------+-----------+----------+---------+---------"]
    for i, pl in enumerate(plans[:top]):
        p, cfg = pl.cfg.parallel, pl.cfg
        tps = cfg.training.global_batch_size * cfg.model.seq_length / pl.times["total"]
        rows.append(f" {i + 1:4d} | {p.tensor_model_parallel_size:3d} | {p.pipeline_model_parallel_size:3d} | "
                    f"{cfg.data_parallel_size:3d} | {'yes' if p.use_distributed_optimizer else 'no':>8} | "
                    f"{cfg.model.recompute_granularity or 'none':>9} | {gib(pl.peak_memory):>8} | "
                    f"{1000 * pl.times['total']:7.1f} | {tps:8,.0f}")
    if len(plans) > top:
        rows.append(f" ... {len(plans) - top} more fit")
    return "\n".join(rows)


def main(argv=None) -> int:
    cfg, hw, ns = parse(argv)
    vocab = vocab_size_of(cfg)
    if ns.world_size is None:
        print(default_world_size_line(cfg))
    if ns.search:
        plans = planning.search(cfg, vocab, hw)
        print(f"layouts of {cfg.world_size} ranks that fit in {hw.device_memory_gb:g} GiB, fastest first "
              f"(SP on with TP > 1; peak {hw.peak_tflops:g} TFLOP/s x efficiency {hw.efficiency:g}):")
        print(format_search(plans, ns.top))
        return 0 if plans else 1
    print(format_plan(planning.plan(cfg, vocab, hw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
