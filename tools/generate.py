"""Generate text from a megalite checkpoint: greedy, or sampling with temperature / top-k / top-p.

    python tools/generate.py --load /tmp/ckpt --prompt "def main(" --max-new-tokens 40 --greedy
    python tools/generate.py --load /tmp/ckpt --prompt "import " --top-k 20 --top-p 0.9 --temperature 0.8 --seed 7
    torchrun --nproc_per_node 2 tools/generate.py --load /tmp/ckpt --prompt "def " --greedy \\
        --tensor-model-parallel-size 2

The model options and the tokenizer come from the checkpoint (its saved config: the built-in
corpus trains with the ByteTokenizer); --tokenizer-* override the tokenizer and --prompt-ids
takes token ids directly (e.g. for a --mock-data checkpoint). The checkpoint may have any
TP/PP layout; generation runs as one pipeline stage (PP=1) at the given TP size, on full
recomputation per token (no KV cache). Vocab-parallel logits are gathered over TP and the
padded vocabulary entries dropped before choosing a token; all TP ranks continue with TP rank
0's token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megalite.checkpointing import convert as mc  # noqa: E402
from megalite.interop import hf as hc  # noqa: E402
from megalite.config import Config, DataConfig  # noqa: E402
from megalite.tensor_parallel import gather_from_tensor_parallel  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="megalite checkpoint directory (latest iteration is used)")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--prompt-ids", type=int, nargs="+", help="prompt as token ids (instead of --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass (1.0: all)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP size (default: world size)")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's --tokenizer-type")
    p.add_argument("--tokenizer-model", default=None, help="override --tokenizer-model")
    p.add_argument("--vocab-file", default=None, help="override --vocab-file")
    p.add_argument("--merge-file", default=None, help="override --merge-file")
    p.add_argument("--output-ids", action="store_true", help="also print the generated ids as JSON")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="as pretrain_gpt.py's: one GPU per process (cuda), the CPU, or auto (default)")
    return p


def local_device(requested: str) -> torch.device:
    """pretrain_gpt.py's choice: this process's device from torchrun's local rank, the node's
    process count and the visible GPUs; a node with too few GPUs exits with one line."""
    from megalite.training.device import DeviceUnavailable, choose_device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    gpus = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
    try:
        return choose_device(requested, local_rank, local_world_size, gpus)
    except DeviceUnavailable as e:
        if local_rank == 0:
            print(f"generate: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def load_model(root: str, pstate, device=torch.device("cpu")):
    """``(model chunk in eval mode, vocab size, common.pt)`` of the latest checkpoint under ``root``."""
    from megalite.model import build_model
    full, common = mc.read_megalite_checkpoint(root)
    cfg = Config(model=mc.model_config_of(common), world_size=pstate.world_size)
    cfg.parallel.tensor_model_parallel_size = pstate.tp_size
    vocab = full["word_embeddings.weight"].shape[0]
    chunks = build_model(cfg, pstate, vocab)
    mc.load_full_into(chunks, full, pstate.tp_rank, pstate.tp_size)
    return chunks[0].to(device).eval(), vocab, common


def next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> int:
    """Choose a token from fp32 ``logits [vocab]``: argmax, or a draw after temperature, top-k, top-p."""
    if greedy or top_k == 1:
        return int(logits.argmax())
    logits = logits / max(temperature, 1e-6)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model, pstate, vocab: int, prompt_ids: list[int], max_new_tokens: int, greedy: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 1234,
             eod: int | None = None) -> list[int]:
    """The new token ids after ``prompt_ids`` (stops after ``eod`` when given). Collective over TP."""
    if not prompt_ids:
        raise ValueError("empty prompt: give --prompt or --prompt-ids")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    limit = model.cfg.max_position_embeddings if model.cfg.position_embedding_type == "learned_absolute" else None
    tokens, new = list(prompt_ids), []
    for _ in range(max_new_tokens):
        context = tokens[-limit:] if limit else tokens
        logits = model(torch.tensor([context], device=device))[:, -1]  # [1, padded vocab / tp]
        logits = gather_from_tensor_parallel(logits, pstate.tp_group)[0, :vocab].float()  # drop padding rows
        token = torch.tensor([next_token(logits, greedy, temperature, top_k, top_p, generator)], device=device)
        if pstate.tp_group is not None and pstate.tp_size > 1:  # every TP rank continues with rank 0's token
            dist.broadcast(token, src=pstate.group_ranks["tp"][0], group=pstate.tp_group)
        tokens.append(int(token))
        new.append(int(token))
        if eod is not None and new[-1] == eod:
            break
    return new


def _tokenizer(args, common: dict):
    from megalite.data.build import build_tokenizer_from_config
    saved = common["config"].get("data", {})
    data = DataConfig(**{**saved, **{k: getattr(args, k) for k in ("tokenizer_type", "tokenizer_model",
                                                                     "vocab_file", "merge_file")
                                     if getattr(args, k) is not None}})
    return build_tokenizer_from_config(data)


def main(argv=None) -> list[int]:
    args = build_parser().parse_args(argv)
    from megalite.parallel_state import ParallelState
    from megalite.training.device import process_group_backend
    device = local_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized() and "MASTER_ADDR" in os.environ:  # launched by torchrun
        dist.init_process_group(process_group_backend(device))
    world = dist.get_world_size() if dist.is_initialized() else 1
    pstate = ParallelState.from_sizes(tp=args.tensor_model_parallel_size or world)
    model, vocab, common = load_model(args.load, pstate, device)
    tokenizer = None
    if args.prompt_ids is None or not common["config"].get("data", {}).get("mock_data"):
        try:
            tokenizer = _tokenizer(args, common)
        except (OSError, ValueError, ImportError) as e:
            if args.prompt_ids is None:
                raise SystemExit(f"generate: cannot build the training tokenizer: {e} (pass --tokenizer-* flags "
                                 "or --prompt-ids)") from None
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise SystemExit(f"generate: tokenizer has {tokenizer.vocab_size} tokens, the model {vocab}: "
                             "pass the training tokenizer (--tokenizer-*) or --prompt-ids")
    prompt = args.prompt_ids if args.prompt_ids is not None else tokenizer.tokenize(args.prompt)
    eod = None if args.ignore_eod or tokenizer is None else tokenizer.eod
    new = generate(model, pstate, vocab, prompt, args.max_new_tokens, args.greedy, args.temperature,
                   args.top_k, args.top_p, args.seed, eod)
    if pstate.rank == 0:
        if tokenizer is not None:
            print(tokenizer.detokenize(prompt) + tokenizer.detokenize(new), flush=True)
        if args.output_ids or tokenizer is None:
            print(json.dumps({"prompt_ids": list(prompt), "generated_ids": new}), flush=True)
    return new


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
