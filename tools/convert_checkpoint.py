"""Convert checkpoints between megalite and Hugging Face transformers (GPT-2, Llama) or Megatron-LM, on CPU.

    python tools/convert_checkpoint.py --direction hf-to-megalite --load HF_DIR --save MEGALITE_DIR \\
        --target-tensor-parallel-size 2 --target-pipeline-model-parallel-size 2 --verify
    python tools/convert_checkpoint.py --direction megalite-to-hf --load MEGALITE_DIR --save HF_DIR --verify
    python tools/convert_checkpoint.py --direction megatron-to-megalite --load MEGATRON_SAVE_DIR \\
        --save MEGALITE_DIR --target-tensor-parallel-size 2 [--true-vocab-size V]
    python tools/convert_checkpoint.py --direction megalite-to-megatron --load MEGALITE_DIR \\
        --save MEGATRON_SAVE_DIR --ckpt-format torch_dist|torch --target-tensor-parallel-size 2 \\
        [--target-pipeline-model-parallel-size P] [--transformer-impl local|transformer_engine]

megatron-to-megalite reads the latest checkpoint of a Megatron-LM --save directory (legacy
mp_rank_* files of any TP x PP, virtual stages included, or torch_dist) without megatron-core,
takes the model flags from the saved args and writes model weights (see hf-to-megalite below).
megalite-to-megatron writes a Megatron-LM checkpoint (megatron-core GPTModel names) that
Megatron-LM loads with --finetune or --no-load-optim --no-load-rng; torch_dist loads at any
TP x PP, torch (legacy) at the chosen one. docs/checkpoints.md, "Coming from Megatron-LM".

hf-to-megalite reads HF_DIR/config.json and its *.safetensors (GPT2LMHeadModel or
LlamaForCausalLM) and writes a megalite checkpoint (iteration --iteration, default 0) in the
chosen TP x PP layout: model weights only, so load it with
``pretrain_gpt.py --load MEGALITE_DIR --finetune`` (or ``--no-load-optim``) and the model
flags this tool prints. megalite-to-hf reads the latest checkpoint of any TP/PP layout and
writes config.json + model.safetensors that ``AutoModelForCausalLM.from_pretrained`` loads.
No training model is built; --verify builds the HF model and a single-process megalite model
and compares their logits on random tokens (fails if the max abs difference > 1e-4).

Mapping and assumptions (docs/checkpoints.md has the full table):
  * megalite fuses QKV per key/value group, rows [q_1..q_k, k, v] for each group; HF GPT-2's
    c_attn is a Conv1D [h, 3h] (transposed, columns q|k|v), HF Llama has q/k/v_proj apart.
  * SwiGLU fc1 rows are [gate; up] = HF Llama [gate_proj; up_proj]; fc2 = down_proj.
  * All GPT-2 Conv1D weights ([in, out]) are transposed to megalite's [out, in].
  * RoPE is the non-interleaved rotate_half form in both: q/k rows are not permuted.
  * Norm epsilon: GPT-2 layer_norm_epsilon / Llama rms_norm_eps <-> --norm-epsilon.
  * Vocabulary: HF vocab_size = the real vocabulary; megalite pads its tables only in memory.
  * Tied embeddings: GPT-2 ties (no lm_head in the file); Llama's tie_word_embeddings false
    <-> --untie-embeddings-and-output-weights.
  * GPT-2's gelu_new (tanh GELU) <-> --openai-gelu; megalite's default exact GELU is exported
    as activation_function "gelu".
  * Biases: GPT-2 has them everywhere; Llama has none (--disable-bias-linear) unless
    attention_bias and mlp_bias are both true.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megalite.checkpointing import convert as mc  # noqa: E402
from megalite.interop import hf as hc, megatron as mm  # noqa: E402
from megalite.interop.megatron import legacy as mio  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--direction", required=True, choices=["hf-to-megalite", "megalite-to-hf",
                                                                "megatron-to-megalite", "megalite-to-megatron"])
    parser.add_argument("--load", required=True,
                        help="source: HF model directory, megalite or Megatron-LM checkpoint directory")
    parser.add_argument("--save", required=True, help="destination directory (created)")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1,
                        help="megalite or Megatron output TP (default 1)")
    parser.add_argument("--target-pipeline-model-parallel-size", type=int, default=1,
                        help="megalite or Megatron output PP (default 1)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="vocab padding multiple (megalite output: recorded in the config; Megatron output: "
                             "the padded vocab is a multiple of it x TP). Default: the source's, else 128")
    parser.add_argument("--iteration", type=int, default=None,
                        help="output iteration number (default: the source checkpoint's; 0 from Hugging Face)")
    megatron = parser.add_argument_group("Megatron-LM")
    megatron.add_argument("--ckpt-format", choices=list(mio.FORMATS), default="torch_dist",
                          help="Megatron output format: torch_dist (default) or torch (legacy mp_rank_*)")
    megatron.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default="transformer_engine",
                          help="Megatron output: the layer spec whose tensor names to write (legacy format) and "
                               "record (default transformer_engine, Megatron-LM's default)")
    megatron.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                          help="Megatron legacy output: virtual pipeline stages (model0, model1... per file)")
    megatron.add_argument("--true-vocab-size", type=int, default=None,
                          help="megatron-to-megalite: keep this many vocabulary rows (default: the vocabulary of "
                               "the tokenizer in the Megatron args, else every padded row)")
    parser.add_argument("--model-type", choices=["auto", "gpt2", "llama", "mixtral"], default="auto",
                        help="HF output architecture (default: from the megalite model options)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="HF or Megatron output dtype (default float32)")
    parser.add_argument("--verify", action="store_true", help="compare HF and megalite logits after converting")
    parser.add_argument("--verify-tolerance", type=float, default=1e-4, help="max abs logit difference (1e-4)")
    return parser


def read_hf(directory: str) -> tuple[dict, dict]:
    """config.json and every tensor of the safetensors files of an HF model directory."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --load must be a Hugging Face model directory")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted({os.path.join(directory, f) for f in json.load(open(index))["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory} (re-save the model with safe_serialization=True)")
    state = {}
    for f in files:
        state.update(load_file(f))
    return json.load(open(config_path)), state


def write_hf(directory: str, config, state: dict) -> None:
    """config.json + model.safetensors, each written to a temp name then renamed."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "model.safetensors")
    save_file(state, target + ".tmp", metadata={"format": "pt"})
    os.replace(target + ".tmp", target)
    config.to_json_file(os.path.join(directory, "config.json.tmp"))
    os.replace(os.path.join(directory, "config.json.tmp"), os.path.join(directory, "config.json"))


def hf_to_megalite(args) -> tuple[str, dict, int]:
    hf_config, state = read_hf(args.load)
    arch, m, vocab = hc.model_config_from_hf(hf_config)
    full = hc.hf_to_megalite(arch, state, m)
    data = {"vocab_size": vocab}
    if os.path.isfile(os.path.join(args.load, "tokenizer.json")):  # so tools/generate.py finds it
        data.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=os.path.abspath(args.load))
    path = mc.save_megalite_checkpoint(full, m, vocab, args.save, args.target_tensor_parallel_size,
                                       args.target_pipeline_model_parallel_size, args.iteration or 0, data,
                                       source=os.path.abspath(args.load),
                                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by or 128)
    print(f"> converted Hugging Face {arch} ({hf_config.get('model_type')}, vocab {vocab}) to {path} "
          f"(TP {args.target_tensor_parallel_size}, PP {args.target_pipeline_model_parallel_size})")
    print("> train it with: pretrain_gpt.py --load " + args.save + " --finetune " + " ".join(hc.megalite_flags(m))
          + (" --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + args.load if "tokenizer_type" in data
             else f"  (and a tokenizer of exactly {vocab} tokens)"))
    return arch, m, vocab


def _eod_of(common: dict):
    """The end-of-document id of the training tokenizer, when it can be built (else None)."""
    from megalite.data.build import build_tokenizer_from_config
    from megalite.config import DataConfig
    data = DataConfig(**common["config"].get("data", {}))
    if data.mock_data:
        return None
    try:
        return build_tokenizer_from_config(data).eod
    except (OSError, ValueError, ImportError):
        return None


def megalite_to_hf(args) -> tuple[str, dict, int]:
    full, common = mc.read_megalite_checkpoint(args.load)
    m = dataclasses.asdict(mc.model_config_of(common))
    vocab = full["word_embeddings.weight"].shape[0]
    arch = hc.detect_megalite_arch(m) if args.model_type == "auto" else args.model_type
    dtype = DTYPES[args.dtype]
    config = hc.hf_config_from_megalite(arch, m, vocab, dtype, eod=_eod_of(common))
    state = {k: v.to(dtype) for k, v in hc.megalite_to_hf(arch, full, m).items()}
    write_hf(args.save, config, state)
    print(f"> converted megalite checkpoint {args.load} (iteration {common['iteration']}, TP {common['layout']['tp']} "
          f"PP {common['layout']['pp']}) to Hugging Face {hc.ARCHITECTURES[arch]} in {args.save}")
    return arch, m, vocab


def _megatron_vocab(explicit: int | None, margs, data: dict, rows: int) -> tuple[int, str]:
    """How many vocabulary rows of a Megatron checkpoint are real tokens, and why."""
    if explicit:
        if explicit > rows:
            raise hc.ConversionError(f"--true-vocab-size {explicit} > the checkpoint's {rows} vocabulary rows")
        return explicit, "--true-vocab-size"
    if getattr(margs, "true_vocab_size", None):
        return margs.true_vocab_size, "true_vocab_size in the Megatron args, as megalite-to-megatron records it"
    if data.get("tokenizer_type"):
        from megalite.config import DataConfig
        from megalite.data.build import build_tokenizer_from_config
        try:
            return build_tokenizer_from_config(DataConfig(**data)).vocab_size, f"the {data['tokenizer_type']}"
        except (OSError, ValueError, ImportError, KeyError, TypeError):
            pass
    return rows, "every padded row: the Megatron args name no tokenizer megalite can build; pass --true-vocab-size"


def megatron_to_megalite(args) -> tuple[str, dict, int]:
    src = mio.read_megatron_checkpoint(args.load)
    margs, tp, pp = src["args"], args.target_tensor_parallel_size, args.target_pipeline_model_parallel_size
    m = mm.model_config_from_args(margs)
    rows = src["tensors"]["embedding.word_embeddings.weight"].shape[0]
    data = mm.tokenizer_data(margs)
    vocab, why = _megatron_vocab(args.true_vocab_size, margs, data, rows)
    full = mm.megatron_to_megalite(src["tensors"], m, vocab)
    divisible = args.make_vocab_size_divisible_by or getattr(margs, "make_vocab_size_divisible_by", None) or 128
    iteration = src["iteration"] if args.iteration is None else args.iteration
    path = mc.save_megalite_checkpoint(full, m, vocab, args.save, tp, pp, iteration, data or {"vocab_size": vocab},
                                       source=os.path.abspath(src["directory"]), make_vocab_size_divisible_by=divisible)
    saved_at = (getattr(margs, "tensor_model_parallel_size", 1), getattr(margs, "pipeline_model_parallel_size", 1))
    print(f"> converted Megatron-LM {src['format']} checkpoint {src['directory']} (iteration {src['iteration']}, "
          f"saved at TP {saved_at[0]} PP {saved_at[1]}) to {path} (TP {tp}, PP {pp})")
    print(f"> vocabulary: {vocab} of {rows} rows ({why})")
    tokenizer = [f"--{k.replace('_', '-')} {v}" for k, v in data.items()]
    print("> train it with: pretrain_gpt.py --load " + args.save + " --finetune " + " ".join(hc.megalite_flags(m))
          + f" --seq-length {m['seq_length']} --make-vocab-size-divisible-by {divisible} "
          + (" ".join(tokenizer) if tokenizer else f"(and a tokenizer of exactly {vocab} tokens)"))
    return "megatron", m, vocab


def megalite_to_megatron(args) -> tuple[str, dict, int]:
    full, common = mc.read_megalite_checkpoint(args.load)
    m = dataclasses.asdict(mc.model_config_of(common))
    vocab = full["word_embeddings.weight"].shape[0]
    tp, pp, per_vstage = (args.target_tensor_parallel_size, args.target_pipeline_model_parallel_size,
                          args.target_num_layers_per_virtual_pipeline_stage)
    vpp = m["num_layers"] // (pp * per_vstage) if per_vstage else None
    if vpp and args.ckpt_format != "torch":
        raise hc.ConversionError("--target-num-layers-per-virtual-pipeline-stage applies to --ckpt-format torch; "
                                 "a torch_dist checkpoint loads at any layout")
    mm.check_target_layout(m, tp, pp, vpp)
    divisible = args.make_vocab_size_divisible_by or m["make_vocab_size_divisible_by"]
    from megalite.tensor_parallel import pad_vocab_size
    padded = pad_vocab_size(vocab, divisible, tp)
    data = {k: v for k, v in common["config"].get("data", {}).items()
            if k in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")}
    margs = mm.args_from_model_config(m, padded, tp, pp, vpp, DTYPES[args.dtype], args.transformer_impl,
                                      args.ckpt_format, divisible, data, true_vocab=vocab)
    iteration = common["iteration"] if args.iteration is None else args.iteration
    path = mio.write_megatron_checkpoint(mm.megalite_to_megatron(full, m, padded), margs, args.save,
                                         args.ckpt_format, tp, pp, iteration, vpp,
                                         args.transformer_impl == "transformer_engine", DTYPES[args.dtype])
    print(f"> converted megalite checkpoint {args.load} (iteration {common['iteration']}, TP {common['layout']['tp']} "
          f"PP {common['layout']['pp']}) to Megatron-LM {args.ckpt_format} checkpoint {path} "
          f"(TP {tp}, PP {pp}, vocab {vocab} padded to {padded})")
    print(f"> load it in Megatron-LM with: pretrain_gpt.py --load {args.save} --finetune "
          + " ".join(mm.megatron_flags(margs)) + " (or --use-checkpoint-args)")
    return "megatron", m, vocab


@torch.no_grad()
def verify(hf_dir: str, megalite_dir: str, tolerance: float, batch: int = 2, seq: int = 16) -> float:
    """Max abs difference of HF and megalite logits on random tokens; exits 1 above ``tolerance``."""
    from transformers import AutoModelForCausalLM
    full, common = mc.read_megalite_checkpoint(megalite_dir)
    model_cfg = mc.model_config_of(common)
    vocab = full["word_embeddings.weight"].shape[0]
    ours = mc.build_reference_model(model_cfg, vocab, full)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    seq = min(seq, model_cfg.max_position_embeddings or seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    diff = (ours(ids)[..., :vocab].float() - theirs(ids).logits.float()).abs().max().item()
    print(f"> verify: max abs logit difference {diff:.3e} (HF vs megalite, {batch}x{seq} random tokens)")
    if not diff <= tolerance:
        raise SystemExit(f"verify failed: logits differ by {diff:.3e} > {tolerance:g}")
    return diff


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    megatron = "megatron" in args.direction
    if megatron and args.verify:
        raise SystemExit("convert_checkpoint: error: --verify compares with Hugging Face transformers; the "
                         "Megatron directions are checked against megatron-core by tests/test_megatron_checkpoints.py")
    try:
        if args.direction == "hf-to-megalite":
            arch, m, vocab = hf_to_megalite(args)
            hf_dir, megalite_dir = args.load, args.save
        elif args.direction == "megalite-to-hf":
            arch, m, vocab = megalite_to_hf(args)
            hf_dir, megalite_dir = args.save, args.load
        else:
            arch, m, vocab = (megatron_to_megalite if args.direction == "megatron-to-megalite"
                              else megalite_to_megatron)(args)
    except (hc.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"convert_checkpoint: error: {e}")
    result = {"arch": arch, "model": m, "vocab": vocab}
    if args.verify:
        result["max_abs_diff"] = verify(hf_dir, megalite_dir, args.verify_tolerance)
    return result


if __name__ == "__main__":
    main()
