"""MoE cost: megalite's MoELayer and a small MoE GPT vs plain PyTorch, and the dispatch at EP 1/2/4.

    python benchmarks/moe.py                           # the three tables of docs/performance.md ("MoE")
    python benchmarks/moe.py --reps 3 --iters 2 --ep-sizes 1 2

1. **Layer**: one ``MoELayer`` (fp32, one process, forward + backward of ``sum(out * g)``)
   against :class:`ReferenceMoE`, a plain PyTorch MoE written here (a router ``nn.Linear``,
   top-k of the logits then a softmax over the k, a loop over the experts with
   ``index_select`` / ``index_add_``) holding the same weights. Outputs and input grads are
   compared first (max abs diff, must be < 1e-5), then both are timed interleaved
   (step_time.time_runners: A B A B ..., the order flipped every round).
2. **Step**: a small MoE GPT trained by megalite's ``Trainer`` (as step_time.build_megalite,
   plus the MoE flags) against reference_gpt's plain GPT whose MLPs are :class:`ReferenceMoE`
   (:class:`ReferenceMoEGPT`), same weights, same fused AdamW, clipping at 1.0. Aux and z
   losses are off (``--moe-aux-loss-coeff 0``), so both train on the LM loss only; megalite
   still computes its router statistics (tokens per expert, for the log line). The losses of
   the first ``--check-steps`` iterations are compared, then the step is timed interleaved.
3. **Dispatch**: the layer alone on 1, 2 and 4 gloo processes (scaling.launch, one torch
   thread each) with expert-model-parallel size = world, the same tokens per rank, both
   dispatchers alternating in one launch. Per dispatcher: the median forward + backward time of
   rank 0, its ratio to EP=1, and the share of it spent inside the dispatch collectives
   (all-gather / reduce-scatter / all-to-all, waits for the other ranks included). With more
   processes than cores (EP=4 on 2 cores) the step time is oversubscribed: read the share.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_gpt  # noqa: E402
import step_time  # noqa: E402

LR, WEIGHT_DECAY, CLIP = step_time.LR, step_time.WEIGHT_DECAY, step_time.CLIP


# -- the plain PyTorch reference (no megalite import) -------------------------------------
class ReferenceMoE(nn.Module):
    """Top-k MoE: softmax over the top-k router logits, GELU expert MLPs without biases."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int):
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.fc1 = nn.ModuleList(nn.Linear(hidden, ffn, bias=False) for _ in range(num_experts))
        self.fc2 = nn.ModuleList(nn.Linear(ffn, hidden, bias=False) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        top, experts = torch.topk(self.router(tokens), self.topk, dim=-1)
        weights = torch.softmax(top, dim=-1)
        out = torch.zeros_like(tokens)
        for e, (fc1, fc2) in enumerate(zip(self.fc1, self.fc2)):
            token, slot = (experts == e).nonzero(as_tuple=True)
            if token.numel():
                y = fc2(F.gelu(fc1(tokens.index_select(0, token))))
                out.index_add_(0, token, y * weights[token, slot].unsqueeze(1))
        return out.view(x.shape)


class MoEBlock(reference_gpt.Block):
    """reference_gpt.Block with its MLP replaced by a :class:`ReferenceMoE`."""

    def __init__(self, hidden, heads, ffn, std, num_layers, num_experts, topk):
        super().__init__(hidden, heads, ffn, std, num_layers)
        del self.c_fc, self.mlp_proj
        self.moe = ReferenceMoE(hidden, ffn, num_experts, topk)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


class ReferenceMoEGPT(reference_gpt.ReferenceGPT):
    def __init__(self, c: dict, ffn: int, num_experts: int, topk: int):
        super().__init__(c["vocab_size"], c["seq_length"], c["hidden_size"], c["num_attention_heads"], 1)
        self.blocks = nn.ModuleList(MoEBlock(c["hidden_size"], c["num_attention_heads"], ffn, 0.02, c["num_layers"],
                                             num_experts, topk) for _ in range(c["num_layers"]))


@torch.no_grad()
def copy_moe(ref: ReferenceMoE, layer) -> None:
    """Load a serial megalite ``MoELayer``'s router and expert weights."""
    ref.router.weight.copy_(layer.router.weight)
    for fc1, fc2, expert in zip(ref.fc1, ref.fc2, layer.experts):
        fc1.weight.copy_(expert.fc1.weight)
        fc2.weight.copy_(expert.fc2.weight)


@torch.no_grad()
def copy_gpt(ref: ReferenceMoEGPT, chunk) -> None:
    """reference_gpt.copy_from_megalite for a GPT whose every MLP is an MoELayer."""
    vocab, heads = ref.wte.weight.shape[0], ref.blocks[0].heads
    ref.wte.weight.copy_(chunk.word_embeddings.weight[:vocab])
    ref.wpe.weight.copy_(chunk.position_embeddings.weight[:ref.wpe.weight.shape[0]])
    for block, layer in zip(ref.blocks, chunk.layers):
        h = block.ln_1.weight.shape[0]
        qkv_w, qkv_b = layer.attention.qkv.weight, layer.attention.qkv.bias
        block.c_attn.weight.copy_(qkv_w.view(heads, 3, h // heads, h).transpose(0, 1).reshape(3 * h, h))
        block.c_attn.bias.copy_(qkv_b.view(heads, 3, h // heads).transpose(0, 1).reshape(3 * h))
        pairs = ((block.ln_1, layer.norm_1), (block.ln_2, layer.norm_2), (block.c_proj, layer.attention.proj))
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        copy_moe(block.moe, layer.mlp)
    ref.ln_f.weight.copy_(chunk.final_norm.weight)
    ref.ln_f.bias.copy_(chunk.final_norm.bias)


# -- 1. the layer alone -------------------------------------------------------------------
def build_layer(hidden: int, ffn: int, experts: int, topk: int, pstate=None, dispatcher: str = "allgather"):
    """A megalite MoELayer in training mode (as tests/test_moe.py builds one), seeded."""
    from megalite.config import Config, ModelConfig, fill_defaults
    from megalite.model.moe import MoELayer, MoERecorder
    from megalite.model.transformer import ParallelContext
    from megalite.parallel_state import ParallelState

    cfg = Config(model=ModelConfig(num_layers=4, hidden_size=hidden, num_attention_heads=4, num_experts=experts,
                                   moe_ffn_hidden_size=ffn, moe_router_topk=topk, moe_token_dispatcher_type=dispatcher))
    fill_defaults(cfg)
    ctx = ParallelContext(pstate or ParallelState.from_sizes(ep=1), None)
    ctx.moe = MoERecorder()
    torch.manual_seed(0)
    return MoELayer(cfg.model, ctx, 0).train()


class LayerRunner:
    """Forward + backward of ``sum(module(x) * g)``; step_time.time_runners' interface."""

    def __init__(self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor):
        self.name, self.module, self.x, self.g = name, module, x.detach().requires_grad_(), g

    def step(self, _batches=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and input grad; the parameter grads (and megalite's router records) are cleared."""
        out = self.module(self.x)
        (out * self.g).sum().backward()
        grad, self.x.grad = self.x.grad, None
        recorder = getattr(getattr(self.module, "router", None), "recorder", None)
        if recorder is not None:
            recorder.records.clear()
        self.module.zero_grad(set_to_none=True)
        return out.detach(), grad


def layer_pair(a: argparse.Namespace, seed: int = 0) -> tuple[LayerRunner, LayerRunner]:
    """(megalite, reference) runners on the same weights, tokens and upstream gradient."""
    layer = build_layer(a.hidden, a.ffn, a.experts, a.topk)
    ref = ReferenceMoE(a.hidden, a.ffn, a.experts, a.topk)
    copy_moe(ref, layer)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(a.seq, a.mb, a.hidden, generator=gen)
    g = torch.randn(a.seq, a.mb, a.hidden, generator=gen)
    return LayerRunner("megalite MoELayer", layer, x, g), LayerRunner("plain PyTorch MoE", ref, x, g)


def layer_diff(mega: LayerRunner, ref: LayerRunner) -> tuple[float, float]:
    """Max abs difference of the outputs and of the input grads."""
    (y1, g1), (y2, g2) = mega.step(), ref.step()
    return float((y1 - y2).abs().max()), float((g1 - g2).abs().max())


def table(times: dict[str, list[float]], ref_name: str) -> float:
    medians = {k: statistics.median(v) for k, v in times.items()}
    print("| implementation | median ms | min | max | n | ratio to plain PyTorch |\n|---|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1e3 * medians[k]:.1f} | {1e3 * min(v):.1f} | {1e3 * max(v):.1f} | {len(v)} "
              f"| {medians[k] / medians[ref_name]:.3f} |")
    return medians[next(iter(times))] / medians[ref_name]


def bench_layer(a) -> float:
    print(f"\n## 1. MoE layer alone: T={a.seq}x{a.mb} tokens h={a.hidden} ffn={a.ffn} E={a.experts} "
          f"top-{a.topk}, forward + backward, fp32, {torch.get_num_threads()} threads")
    mega, ref = layer_pair(a)
    d_out, d_grad = layer_diff(mega, ref)
    print(f"equality: max abs diff output {d_out:.1e}, input grad {d_grad:.1e}")
    assert d_out < 1e-5 and d_grad < 1e-5, "megalite's MoELayer and the reference disagree"
    return table(step_time.time_runners([mega, ref], [], a.reps, a.iters, a.warmup), ref.name)


# -- 2. the training step -------------------------------------------------------------------
def gpt_config(a) -> dict:
    return dict(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=4, seq_length=a.seq,
                micro_batch_size=a.mb, vocab_size=a.vocab)


class MegaliteMoE:
    name = "megalite"

    def __init__(self, a):
        flags = ("--num-experts", str(a.experts), "--moe-ffn-hidden-size", str(a.ffn), "--moe-router-topk",
                 str(a.topk), "--moe-aux-loss-coeff", "0")
        self.trainer = step_time.build_megalite(gpt_config(a), 1, flags)

    def step(self, batches):
        return self.trainer.train_step(batches)["loss"]


class ReferenceMoERunner:
    name = "plain PyTorch"

    def __init__(self, a, mega: MegaliteMoE):
        self.model = ReferenceMoEGPT(gpt_config(a), a.ffn, a.experts, a.topk)
        copy_gpt(self.model, mega.trainer.model[0])
        fused = mega.trainer.optimizer.param_groups[0]["fused"]
        self.optimizer = reference_gpt.reference_optimizer(self.model, LR, WEIGHT_DECAY, fused=fused)

    def step(self, batches):
        return reference_gpt.train_step(self.model, self.optimizer, batches, CLIP)[0]


def bench_step(a) -> float:
    c = gpt_config(a)
    print(f"\n## 2. Training step: MoE GPT {step_time.describe(c, 1)}, every MLP an MoE (E={a.experts}, "
          f"top-{a.topk}, ffn={a.ffn}), fp32, AdamW, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    mega = MegaliteMoE(a)
    ref = ReferenceMoERunner(a, mega)
    pairs = [(mega.step(b), ref.step(b)) for b in (step_time.make_batches(c, 1, seed=i) for i in range(a.check_steps))]
    if pairs:
        worst = max(abs(x - y) / abs(y) for x, y in pairs)
        print("loss check: " + ", ".join(f"it {i + 1}: {x:.6f} vs {y:.6f}" for i, (x, y) in enumerate(pairs))
              + f" | max rel diff {worst:.1e}")
        assert worst < 1e-4, "the MoE GPTs do not train alike"
    return table(step_time.time_runners([mega, ref], step_time.make_batches(c, 1), a.reps, a.iters, a.warmup),
                 ref.name)


# -- 3. dispatch at EP = 1, 2, 4 ------------------------------------------------------------
def _ep_worker(rank, world, a, dispatchers):
    """One rank: the layer at EP = world, both dispatchers alternating; step and comm seconds."""
    import torch.distributed as dist

    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel import mappings

    layer = build_layer(a.hidden, a.ffn, a.experts, a.topk, ParallelState.from_sizes(ep=world))
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens per rank, the same count
    runner = LayerRunner("", layer, torch.randn(a.seq, a.mb, a.hidden, generator=gen),
                         torch.randn(a.seq, a.mb, a.hidden, generator=gen))
    comm = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                comm[0] += time.perf_counter() - start
        return wrapper

    for module, name in ((mappings, "all_gather_single"), (mappings, "reduce_scatter_single"),
                         (dist, "all_to_all_single")):
        setattr(module, name, timed(getattr(module, name)))
    out = {d: {"step": [], "comm": []} for d in dispatchers}
    for i in range(a.warmup + a.ep_iters):
        for d in (dispatchers if i % 2 == 0 else dispatchers[::-1]):
            layer.dispatcher, comm[0] = d, 0.0
            start = time.perf_counter()
            runner.step()
            if i >= a.warmup:
                out[d]["step"].append(time.perf_counter() - start)
                out[d]["comm"].append(comm[0])
    return out


def bench_dispatch(a) -> None:
    import scaling

    dispatchers = ["allgather", "alltoall"]
    print(f"\n## 3. Dispatch: the layer on EP = world gloo processes (1 thread each), T={a.seq}x{a.mb} tokens "
          f"per rank, h={a.hidden} ffn={a.ffn} E={a.experts} top-{a.topk}, forward + backward")
    results = {ep: scaling.launch(_ep_worker, ep, a, dispatchers) for ep in a.ep_sizes}
    base = {d: statistics.median(results[a.ep_sizes[0]][0][d]["step"]) for d in dispatchers}
    print(f"| EP | dispatcher | median ms (rank 0) | vs EP={a.ep_sizes[0]} | dispatch comm (rank 0) "
          f"| comm share (max over ranks) |\n|---|---|---|---|---|---|")
    for ep, ranks in results.items():
        for d in dispatchers:
            step = statistics.median(ranks[0][d]["step"])
            share = max(statistics.median(c / s for c, s in zip(r[d]["comm"], r[d]["step"])) for r in ranks)
            print(f"| {ep} | {d} | {1e3 * step:.1f} | {step / base[d]:.2f} | "
                  f"{1e3 * statistics.median(ranks[0][d]['comm']):.1f} ms | {100 * share:.0f} % |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default, text in (("layers", 4, "GPT layers (part 2)"), ("hidden", 256, "hidden size"),
                                ("ffn", 512, "each expert's hidden size"), ("experts", 8, "experts per layer"),
                                ("topk", 2, "experts per token"), ("seq", 256, "sequence length"),
                                ("mb", 4, "micro-batch size (tokens = seq x mb)"), ("vocab", 8192, "vocabulary")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds (parts 1 and 2)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per implementation and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--check-steps", type=int, default=3, help="iterations of the loss comparison")
    p.add_argument("--ep-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ep-iters", type=int, default=10, help="timed iterations per dispatcher (part 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of parts 1 and 2")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    ratios = {}
    if 1 in a.parts:
        ratios["layer"] = bench_layer(a)
    if 2 in a.parts:
        ratios["step"] = bench_step(a)
    if 3 in a.parts:
        bench_dispatch(a)
    print("\nsummary: " + "; ".join(f"{k} megalite / plain PyTorch = {v:.3f}" for k, v in ratios.items())
          + f" (target <= 1.10; load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
