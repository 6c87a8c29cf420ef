"""tools/convert_checkpoint.py: Hugging Face GPT-2 / Llama <-> megalite, any TP/PP layout.

Tiny random HF models are built locally from configs (never downloaded), with every weight
(norms and biases included) randomised so that a mis-mapped tensor changes the logits.
"""
import json
import os

import pytest
import torch

from distributed_helper import run_distributed
from equivalence import run_layout as train

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megalite.checkpointing import convert as mc  # noqa: E402
from megalite.interop import hf as hc  # noqa: E402
from tools.convert_checkpoint import main as convert  # noqa: E402

VOCAB, SEQ = 100, 16
TP2PP2 = ["--target-tensor-parallel-size", "2", "--target-pipeline-model-parallel-size", "2"]


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "ln" in name or "norm" in name
            p.copy_(1.0 + 0.2 * noise if is_norm and name.endswith("weight") else 0.15 * noise)
    return model


def _hf_model(arch):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      activation_function="gelu_new", layer_norm_epsilon=1e-5, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return _randomize(transformers.GPT2LMHeadModel(cfg), 1)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return _randomize(transformers.LlamaForCausalLM(cfg), 2)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    _hf_model(request.param).save_pretrained(str(path))
    return request.param, str(path)


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids(seed=0, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _megalite_run(rank, world, argv, ckpt, ids, m, names):
    """Load ``ckpt`` the way pretrain_gpt.py --finetune does, at the layout of ``argv``; return the
    gathered logits (last stage) and any disagreement of convert.shard_layout with the
    real parameters' attributes."""
    import torch.distributed as dist
    from megalite.checkpointing.format import shard_meta
    from megalite.model import named_global_parameters
    from megalite.checkpointing import load_checkpoint
    from megalite.config import parse_args
    from megalite.parallel_state import ParallelState
    from megalite.tensor_parallel import gather_from_tensor_parallel
    from megalite.training import Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_sizes(tp=cfg.parallel.tensor_model_parallel_size,
                                  pp=cfg.parallel.pipeline_model_parallel_size)
    trainer = Trainer(cfg, ps, VOCAB, log=lambda msg: None)
    load_checkpoint(trainer, ckpt, finetune=True, log=lambda msg: None)
    mismatches = []
    held = []
    for name, p in named_global_parameters(trainer.model):
        held.append(name)
        real, mine = shard_meta(p, ps.tp_rank, ps.tp_size), mc.shard_layout(name, m, VOCAB)
        if ps.tp_size == 1:
            mine["partition_dim"] = None
        if any(real[k] != mine[k] for k in mine):
            mismatches.append((name, real, mine))
    if sorted(held) != sorted(mc.stage_names(names, m, ps.pp_size, ps.pp_rank)):
        mismatches.append(("stage names", sorted(held), ps.pp_rank))
    chunk = trainer.model[0].eval()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(SEQ, ids.shape[0], cfg.model.hidden_size)
            dist.recv(hidden, src=ps.prev_pp_rank)
            chunk.set_input_tensor(hidden)
        out = chunk(ids)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.next_pp_rank)
            return None, mismatches
        return gather_from_tensor_parallel(out, ps.tp_group)[..., :VOCAB], mismatches


def _flags(m, tp=1, pp=1, extra=()):
    return hc.megalite_flags(m) + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                                   "--mock-data", "--vocab-size", str(VOCAB), "--seq-length", str(SEQ),
                                   "--micro-batch-size", "2", "--train-iters", "1", "--eval-interval", "0", *extra]


def test_qkv_fuse_and_split():
    q, k, v = torch.tensor([0., 1, 2, 3]), torch.tensor([10., 11]), torch.tensor([20., 21])  # head_dim 1
    fused = hc.fuse_qkv(q, k, v, heads=4, groups=2)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # per group [q_1, q_2, k, v]
    assert [t.tolist() for t in hc.split_qkv(fused, 4, 2)] == [q.tolist(), k.tolist(), v.tolist()]
    w = torch.randn(4 * 3 + 2 * 2 * 3, 5)  # 4 heads, 2 groups, head_dim 3, hidden 5
    assert torch.equal(hc.fuse_qkv(*hc.split_qkv(w, 4, 2), 4, 2), w)


def test_hf_to_megalite_logits_equal_at_tp2_pp2_and_tp1(hf_dir, tmp_path):
    arch, path = hf_dir
    tp2pp2, tp1 = str(tmp_path / "tp2pp2"), str(tmp_path / "tp1")
    result = convert(["--direction", "hf-to-megalite", "--load", path, "--save", tp2pp2, *TP2PP2, "--verify"])
    print(f"{arch}: --verify max abs logit diff {result['max_abs_diff']:.3e}")
    assert result["arch"] == arch and result["max_abs_diff"] < 1e-5
    convert(["--direction", "hf-to-megalite", "--load", path, "--save", tp1])
    m = result["model"]
    assert m["openai_gelu"] == (arch == "gpt2") and m["norm_epsilon"] == 1e-5
    assert sorted(os.listdir(os.path.join(tp2pp2, "iter_0000000"))) == [  # one shard per (tp, pp) position
        "common.json", "index.json", "manifest.json", "shard_00000.pt", "shard_00001.pt", "shard_00002.pt",
        "shard_00003.pt"]
    ids = _ids()
    ref = _hf_logits(path, ids)
    assert ref.std() > 0.5  # random weights of a real scale: a mis-mapped tensor would show
    names = list(mc.read_megalite_checkpoint(tp2pp2)[0])
    # TP=2 x PP=2: the same layout as the checkpoint (each rank reads its own file)
    results = run_distributed(_megalite_run, 4, _flags(m, 2, 2), tp2pp2, ids, m, names, timeout=240)
    logits = [r[0] for r in results if r[0] is not None]
    assert len(logits) == 2 and all(not r[1] for r in results), [r[1] for r in results]
    # single process: the TP=1 conversion, and the TP2 x PP2 one resharded at load
    for ckpt in (tp1, tp2pp2):
        got, mismatches = _megalite_run(0, 1, _flags(m), ckpt, ids, m, names)
        assert not mismatches
        logits.append(got)
    diffs = [(got - ref).abs().max().item() for got in logits]
    print(f"{arch}: megalite vs HF max abs logit diff (TP2xPP2 ranks, TP1, TP1 from TP2xPP2): {diffs}")
    assert max(diffs) < 1e-5


def test_round_trip_hf_megalite_hf_is_identical(hf_dir, tmp_path):
    from safetensors.torch import load_file
    arch, path = hf_dir
    convert(["--direction", "hf-to-megalite", "--load", path, "--save", str(tmp_path / "m"), *TP2PP2])
    convert(["--direction", "megalite-to-hf", "--load", str(tmp_path / "m"), "--save", str(tmp_path / "hf")])
    before = load_file(os.path.join(path, "model.safetensors"))
    after = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    old, new = json.load(open(os.path.join(path, "config.json"))), json.load(open(tmp_path / "hf" / "config.json"))
    keys = (["n_layer", "n_embd", "n_head", "n_positions", "activation_function", "layer_norm_epsilon"]
            if arch == "gpt2" else ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                    "num_key_value_heads", "rms_norm_eps", "rope_parameters", "attention_bias"])
    for key in keys + ["vocab_size", "tie_word_embeddings", "architectures"]:
        assert old.get(key) == new.get(key), key


GPT_STYLE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
             "--max-position-embeddings", "32"]
LLAMA_STYLE = GPT_STYLE[:-2] + ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                                "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
                                "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "64"]


LLAMA_WITH_BIASES = [f for f in LLAMA_STYLE if f != "--disable-bias-linear"]  # attention_bias = mlp_bias = true


@pytest.mark.parametrize("arch,model_flags", [("gpt2", GPT_STYLE), ("llama", LLAMA_STYLE),
                                              ("llama", LLAMA_WITH_BIASES)], ids=["gpt2", "llama", "llama-biases"])
def test_trained_megalite_to_hf_gives_the_same_logits(tmp_path, arch, model_flags):
    save = str(tmp_path / "ckpt")
    common = ["--mock-data", "--vocab-size", str(VOCAB), "--micro-batch-size", "2", "--global-batch-size", "4",
              "--lr", "1e-2", "--eval-interval", "0", "--log-interval", "1"]
    run = train(model_flags + common + ["--train-iters", "3", "--tensor-model-parallel-size", "2", "--save", save], 2)
    assert len(run["loss"]) == 3
    out = str(tmp_path / "hf")
    result = convert(["--direction", "megalite-to-hf", "--load", save, "--save", out, "--verify"])
    print(f"{arch}: --verify max abs logit diff {result['max_abs_diff']:.3e}")
    assert result["arch"] == arch
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [hc.ARCHITECTURES[arch]] and config["vocab_size"] == VOCAB
    if arch == "gpt2":
        assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is True
    else:
        assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
        assert config["attention_bias"] == config["mlp_bias"] == ("--disable-bias-linear" not in model_flags)
    ids = _ids(seed=3)
    ref = _hf_logits(out, ids)
    # megalite's own logits: the trained checkpoint loaded by checkpointing.load_checkpoint at its TP=2
    m = result["model"]
    names = list(mc.read_megalite_checkpoint(save)[0])
    got = run_distributed(_megalite_run, 2, _flags(m, tp=2), save, ids, m, names, timeout=240)[0][0]
    diff = (got - ref).abs().max().item()
    print(f"{arch}: trained megalite vs transformers max abs logit diff {diff:.3e}")
    assert diff < 1e-5 and ref.std() > 0.05


def _hf_first_batch_loss(path, seq, gbs, seed=1234):
    from megalite.data.mock_dataset import MockGPTDataset
    data = MockGPTDataset(gbs, seq, VOCAB, seed=seed)
    samples = torch.stack([torch.from_numpy(data[i]) for i in range(gbs)])
    logits = _hf_logits(path, samples[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), samples[:, 1:].reshape(-1)).item()


def test_pretrain_finetune_from_converted_checkpoint(hf_dir, tmp_path):
    """pretrain_gpt.py --load CONVERTED --finetune starts from the HF weights: its first loss is
    the HF model's loss on that batch. Without --finetune / --no-load-optim: a clear error."""
    from megalite.checkpointing import load_checkpoint
    from megalite.config import parse_args
    from megalite.parallel_state import ParallelState
    from megalite.training import Trainer
    arch, path = hf_dir
    ckpt = str(tmp_path / "m")
    m = convert(["--direction", "hf-to-megalite", "--load", path, "--save", ckpt, *TP2PP2])["model"]
    flags = _flags(m, tp=2, extra=["--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1"])
    run = train(flags + ["--load", ckpt, "--finetune", "--train-iters", "2"], 2)
    expected = _hf_first_batch_loss(path, SEQ, 4)
    assert abs(run["loss"][0] - expected) <= 1e-5 * expected, (run["loss"], expected)
    trainer = Trainer(parse_args(_flags(m)), ParallelState.from_sizes(), VOCAB, log=lambda msg: None)
    with pytest.raises(ValueError, match="holds no optimizer state .*--finetune or --no-load-optim"):
        load_checkpoint(trainer, ckpt, log=lambda msg: None)
    lines = []
    assert load_checkpoint(trainer, ckpt, load_optim=False, log=lines.append)  # iteration 0, no RNG files
    assert any("holds no RNG states" in line for line in lines) and trainer.iteration == 0


def test_unsupported_models_are_refused_with_a_reason(tmp_path):
    gpt2 = _hf_model("gpt2").config.to_dict()
    with pytest.raises(hc.ConversionError, match="scale_attn_by_inverse_layer_idx"):
        hc.model_config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
    llama = _hf_model("llama").config.to_dict()
    with pytest.raises(hc.ConversionError, match="rope_type 'linear'"):
        hc.model_config_from_hf({**llama, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(hc.ConversionError, match="only GPT-2"):
        hc.model_config_from_hf({"model_type": "mistral"})
    _, m, _ = hc.model_config_from_hf(llama)
    with pytest.raises(hc.ConversionError, match="no Hugging Face equivalent"):
        hc.detect_megalite_arch({**m, "position_embedding_type": "learned_absolute"})
    with pytest.raises(SystemExit, match="config.json"):
        convert(["--direction", "hf-to-megalite", "--load", str(tmp_path), "--save", str(tmp_path / "x")])


MIXTRAL_STYLE = LLAMA_STYLE + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]


def test_mixtral_both_ways(tmp_path):
    """HF Mixtral -> megalite (logits equal), -> HF again (every tensor identical); and a megalite
    MoE trained at TP2 x SP x EP2 (experts split over expert TP) -> HF with the same logits."""
    from safetensors.torch import load_file
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2,
                                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    path = str(tmp_path / "hf_mixtral")
    _randomize(transformers.MixtralForCausalLM(cfg), 3).save_pretrained(path)
    result = convert(["--direction", "hf-to-megalite", "--load", path, "--save", str(tmp_path / "m"), *TP2PP2,
                      "--verify"])
    print(f"mixtral: hf-to-megalite --verify max abs logit diff {result['max_abs_diff']:.3e}")
    assert result["arch"] == "mixtral" and result["max_abs_diff"] < 1e-5
    assert result["model"]["num_experts"] == 4 and "--num-experts" in hc.megalite_flags(result["model"])
    assert _hf_logits(path, _ids()).std() > 0.5
    convert(["--direction", "megalite-to-hf", "--load", str(tmp_path / "m"), "--save", str(tmp_path / "back")])
    before, after = load_file(os.path.join(path, "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(before) == sorted(after) and any("experts.3.w3" in k for k in after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []

    save = str(tmp_path / "trained")
    run = train(MIXTRAL_STYLE + ["--mock-data", "--vocab-size", str(VOCAB), "--micro-batch-size", "2",
                                 "--global-batch-size", "4", "--lr", "1e-2", "--eval-interval", "0", "--train-iters", "2",
                                 "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--expert-model-parallel-size", "2", "--save", save], 4)
    assert len(run["loss"]) == 2
    result = convert(["--direction", "megalite-to-hf", "--load", save, "--save", str(tmp_path / "hf"), "--verify"])
    print(f"mixtral: trained TP2 EP2 -> HF --verify max abs logit diff {result['max_abs_diff']:.3e}")
    assert result["arch"] == "mixtral" and result["max_abs_diff"] < 1e-5
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["MixtralForCausalLM"]
