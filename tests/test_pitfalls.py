"""Pitfalls users of other Megatron-style libraries keep hitting, each made impossible here.

One section per item of docs/pitfalls.md; items already covered exactly by another test file
are referenced there instead of repeated here.
"""
from __future__ import annotations

import ast
import configparser
import functools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed_helper import run_distributed
from equivalence import TINY, assert_equivalent, run_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PP, TP, VPP = "--pipeline-model-parallel-size", "--tensor-model-parallel-size", "--num-layers-per-virtual-pipeline-stage"


def without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` minus the given flags and their values."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a in flags:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        else:
            out.append(a)
    return out


# -- dataset wrappers (module level: pickled by reference into the spawned ranks) -------------
class WrappedSamples:
    """A dataset seen through ``__getitem__``; subclasses change what a sample looks like."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)


class MaskedSamples(WrappedSamples):
    """Samples whose loss mask drops a different number of labels each: (5 i) mod 15 of 16."""

    def __getitem__(self, i):
        tokens = self.dataset[i]
        mask = np.ones(len(tokens) - 1, dtype=np.float32)
        mask[:(5 * i) % (len(mask) - 1)] = 0.0
        return {"tokens": tokens, "loss_mask": mask}


class FirstBatchMasked(WrappedSamples):
    """Every label of the first 8 samples (the first global batch of TINY) masked out."""

    def __getitem__(self, i):
        tokens = self.dataset[i]
        return {"tokens": tokens, "loss_mask": np.full(len(tokens) - 1, float(i >= 8), dtype=np.float32)}


class RecordingSamples(WrappedSamples):
    """Remembers which sample indices were read, in order."""

    def __init__(self, dataset):
        super().__init__(dataset)
        self.seen = []

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.dataset[i]


class ShortSamples(WrappedSamples):
    """Samples of 9 tokens whatever --seq-length says (a custom dataset's mistake)."""

    def __getitem__(self, i):
        return self.dataset[i][:9]


def _pretrain(rank, world, argv, wrapper=None):
    """pretrain() on this rank (``argv`` may be a list per rank); returns history, log lines,
    warnings and, with :class:`RecordingSamples`, the train sample indices this rank read."""
    import warnings

    from megalite.config import parse_args
    from megalite.data.build import build_datasets
    from megalite.parallel_state import ParallelState
    from megalite.training import pretrain

    argv = argv[rank] if isinstance(argv[0], list) else argv
    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_config(cfg)
    datasets, vocab = build_datasets(cfg, log=lambda m: None)
    if wrapper is not None:
        datasets = tuple(None if d is None else wrapper(d) for d in datasets)
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = pretrain(cfg, ps, datasets, vocab, log=lines.append)
    return {"history": history, "lines": lines, "warnings": [str(w.message) for w in caught],
            "seen": getattr(datasets[0], "seen", None)}


def run(argv, world: int, wrapper=None, timeout: float = 240.0) -> list[dict]:
    return run_distributed(_pretrain, world, argv, wrapper, timeout=timeout)


# == 1. Loss normalisation ====================================================================
def _first_step_by_hand(rank, world, argv):
    """One train step on masked data, and the same loss and grad norm computed by hand:
    sum(loss x mask) / sum(mask) over the whole global batch, its gradient's norm."""
    from megalite.config import parse_args
    from megalite.data.mock_dataset import MockGPTDataset
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    ps = ParallelState.from_sizes()
    trainer = Trainer(cfg, ps, vocab_size=100)
    microbatches = BatchIterator(MaskedSamples(MockGPTDataset(64, 16, 100)), cfg, ps).next_microbatches(
        cfg.num_microbatches)
    chunk = trainer.model[0]
    per_token = [chunk(mb["tokens"], labels=mb["labels"]) for mb in microbatches]
    masks = [mb["loss_mask"] for mb in microbatches]
    loss = sum((l * m).sum() for l, m in zip(per_token, masks)) / sum(m.sum() for m in masks)
    mean_of_means = sum((l * m).sum() / m.sum() for l, m in zip(per_token, masks)) / len(masks)
    loss.backward()  # the grad hooks move the grads into the flat fp32 buffer
    grad_norm = trainer.buffer.grad_data.norm().item()
    stats = trainer.train_step(microbatches)
    return {"by_hand": loss.item(), "mean_of_means": mean_of_means.item(), "grad_norm": grad_norm,
            "masked": [int((m == 0).sum()) for m in masks], "stats": stats}


def test_loss_is_the_token_mean_of_the_global_batch():
    """The logged loss and the gradient are those of sum(loss x mask) / sum(mask) over the
    global batch, not a mean of per-micro-batch (or per-sample) means."""
    got = run_distributed(_first_step_by_hand, 1, TINY)[0]  # 4 micro-batches of 2
    assert len(set(got["masked"])) > 1  # the micro-batches mask different numbers of tokens
    assert abs(got["mean_of_means"] - got["by_hand"]) > 1e-3 * got["by_hand"]  # so the two differ
    assert got["stats"]["loss"] == pytest.approx(got["by_hand"], rel=1e-6)
    assert got["stats"]["grad_norm"] == pytest.approx(got["grad_norm"], rel=1e-5)


MASKED = TINY + ["--train-iters", "3"]


@functools.lru_cache(maxsize=None)
def one_microbatch_masked() -> dict:
    return run_layout(MASKED + ["--micro-batch-size", "8"], 1, wrapper=MaskedSamples)  # one micro-batch


@pytest.mark.parametrize("layout,world", [
    (["--micro-batch-size", "1"], 2),                        # DP2 x 4 micro-batches
    (["--micro-batch-size", "1", PP, "2"], 4),               # PP2 x DP2 x 4 micro-batches, 1F1B
    ([PP, "2", VPP, "1"], 2),                                # interleaved 1F1B, 4 micro-batches of 2
])
def test_masked_loss_and_grads_do_not_depend_on_layout(layout, world):
    assert_equivalent(one_microbatch_masked(), run_layout(MASKED + layout, world, wrapper=MaskedSamples))


def _step_without_loss_tokens(rank, world, argv):
    from megalite.config import parse_args
    from megalite.data.mock_dataset import MockGPTDataset
    from megalite.parallel_state import ParallelState
    from megalite.training import BatchIterator, Trainer

    cfg = parse_args(argv, world_size=world)
    trainer = Trainer(cfg, ParallelState.from_sizes(), vocab_size=100, log=lambda m: None)
    batches = BatchIterator(FirstBatchMasked(MockGPTDataset(64, 16, 100)), cfg, ParallelState.from_sizes())
    before = trainer.buffer.param_data.clone()
    masked = trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    unchanged = torch.equal(before, trainer.buffer.param_data)
    grads_finite = bool(torch.isfinite(trainer.buffer.grad_data).all())
    skipped = trainer.skipped_iterations
    normal = trainer.train_step(batches.next_microbatches(cfg.num_microbatches))
    return {"masked": masked, "normal": normal, "unchanged": unchanged, "grads_finite": grads_finite,
            "skipped": skipped, "changed_after": not torch.equal(before, trainer.buffer.param_data)}


def test_a_global_batch_without_loss_tokens_skips_its_update():
    """0 tokens would make the loss 0/0 and the grads 0 * inf = NaN, poisoning the params: the
    step is skipped instead (params untouched, counted as skipped), and training goes on."""
    got = run_distributed(_step_without_loss_tokens, 1, TINY)[0]
    assert got["unchanged"] and got["grads_finite"] and got["skipped"] == 1
    assert got["masked"]["updated"] is False and math.isnan(got["masked"]["loss"])
    assert got["normal"]["updated"] and math.isfinite(got["normal"]["loss"]) and got["changed_after"]


def test_a_global_batch_without_loss_tokens_is_skipped_on_every_stage():
    results = run(MASKED + [PP, "2"], 2, FirstBatchMasked)
    assert [h["updated"] for h in results[0]["history"]] == [h["updated"] for h in results[1]["history"]]
    assert [h["updated"] for h in results[0]["history"]] == [False, True, True]
    assert any("no token with loss_mask > 0; update skipped" in line for line in results[0]["lines"])
    last_stage = results[1]  # the logging rank
    assert all(math.isfinite(h["loss"]) for h in last_stage["history"][1:])
    iteration_lines = [line for line in last_stage["lines"] if "lm loss" in line]
    assert len(iteration_lines) == 3 and "number of skipped iterations:   1 |" in iteration_lines[-1]


# == 4. Pipeline configurations that cannot work fail at start-up ==============================
@pytest.mark.parametrize("argv,world,message", [
    (["--num-layers", "8", PP, "4", VPP, "1", "--global-batch-size", "8", "--micro-batch-size", "4"], 4,
     "needs the number of micro-batches (2 = global batch / (micro batch x DP)) to be a multiple of "
     "--pipeline-model-parallel-size 4"),
    (["--num-layers", "8", PP, "2", VPP, "3"], 2,
     "--num-layers 8 / --pipeline-model-parallel-size 2 = 4 layers per stage is not divisible by "
     "--num-layers-per-virtual-pipeline-stage 3"),
    (["--num-layers", "2", PP, "4"], 4, "--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    ([VPP, "1"], 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
    (["--sequence-parallel", TP, "4", "--seq-length", "18", "--max-position-embeddings", "18"], 4,
     "--sequence-parallel needs --seq-length 18 (per context-parallel rank) divisible by "
     "--tensor-model-parallel-size 4"),
])
def test_impossible_pipeline_layouts_fail_at_startup(argv, world, message, capsys):
    from megalite.config import parse_args
    with pytest.raises(SystemExit):
        parse_args(TINY + argv, world_size=world)
    assert message in capsys.readouterr().err


def test_ranks_launched_with_different_flags_fail_naming_rank_and_flag():
    """A DP rank with another --lr would otherwise train on silently, out of step."""
    argv = [TINY, TINY + ["--lr", "1e-3"]]
    with pytest.raises(RuntimeError, match=re.escape(
            "ranks [1] were launched with different flags than rank 0: rank 1: --lr 0.001 (rank 0: 0.003)")):
        run(argv, 2)


def test_torchrun_ranks_with_different_layouts_fail_instead_of_hanging(tmp_path):
    """Rank 1 started with TP=2, rank 0 with TP=1: without the start-up check the process groups
    would be built differently on the two ranks (a hang)."""
    script = tmp_path / "launch.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport pretrain_gpt\n"
                      "extra = ['--tensor-model-parallel-size', '2'] if os.environ['RANK'] == '1' else []\n"
                      "sys.exit(pretrain_gpt.main(sys.argv[1:] + extra))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *TINY, "--train-iters", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: torchrun stops its workers (a SIGKILL would orphan them)
        output, _ = proc.communicate(timeout=30)
        pytest.fail("ranks launched with different flags hung instead of failing at start-up")
    assert proc.returncode != 0
    assert ("ranks [1] were launched with different flags than rank 0: rank 1: "
            "--tensor-model-parallel-size 2 (rank 0: 1)") in output


def test_stage_output_of_the_wrong_shape_is_refused_before_sending():
    """gloo fills a larger receive buffer partly and silently: the sender must refuse."""
    with pytest.raises(RuntimeError, match=re.escape(
            "pipeline stage 0: activation to the next stage has shape (8, 2, 32) torch.float32, "
            "but the other stage receives (16, 2, 32) torch.float32")):
        run(TINY + [PP, "2", "--train-iters", "1"], 2, ShortSamples, timeout=60)


def _hang(rank, world):
    import time
    if rank == 1:
        time.sleep(60)  # stuck (a collective would also hit gloo's timeout, set to the same value)


def test_spawn_helper_turns_a_hang_into_a_failure():
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 did not finish within 3s"):
        run_distributed(_hang, 2, timeout=3)


def test_every_test_subprocess_has_a_timeout():
    """CI never blocks: a global pytest-timeout, and an explicit timeout on every subprocess.run
    and next to every Popen (torchrun launches included) in the test files."""
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    assert 0 < int(ini["pytest"]["timeout"]) <= 900
    import pytest_timeout  # noqa: F401  the plugin that enforces it
    missing = []
    tests = os.path.join(ROOT, "tests")
    for name in sorted(os.listdir(tests)):
        if not name.endswith(".py"):
            continue
        source = open(os.path.join(tests, name)).read()
        tree = ast.parse(source)
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [tree]:
            body = ast.get_source_segment(source, func) if func is not tree else ""
            for call in ast.walk(func):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "subprocess"):
                    continue
                if call.func.attr == "run" and not any(k.arg == "timeout" for k in call.keywords):
                    missing.append(f"{name}:{call.lineno} subprocess.run")
                if call.func.attr == "Popen" and func is not tree and not re.search(r"timeout|deadline", body):
                    missing.append(f"{name}:{call.lineno} subprocess.Popen")
    assert not missing, f"test subprocesses without a timeout: {sorted(set(missing))}"


# == 5. Resume semantics ======================================================================
RESUME = TINY + ["--train-iters", "6"]


def test_resume_reads_exactly_the_samples_of_the_uninterrupted_run(tmp_path):
    save = str(tmp_path / "ckpt")
    straight = [r["seen"] for r in run(RESUME, 2, RecordingSamples)]  # DP2: 4 samples per rank per step
    first = run(RESUME + ["--save", save, "--exit-interval", "3"], 2, RecordingSamples)
    second = run(RESUME + ["--load", save], 2, RecordingSamples)
    for rank in range(2):
        assert len(straight[rank]) == 24
        assert first[rank]["seen"] + second[rank]["seen"] == straight[rank], f"DP rank {rank}"
    assert not any("RNG" in w for r in second for w in r["warnings"])  # same layout: RNG restored too
    # Resumed on one rank instead of two: the same global batches, and a warning for the RNG.
    (resized,) = run(RESUME + ["--load", save], 1, RecordingSamples)
    assert resized["seen"] == list(range(24, 48))
    assert sorted(straight[0][12:] + straight[1][12:]) == resized["seen"]
    assert any("per-rank RNG states are not restored" in w for w in resized["warnings"]), resized["warnings"]


# == 6. Data tools ============================================================================
# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss keeps the parent's peak across fork + exec,
# so in a child of this (torch-loaded) pytest process it would hide any growth.
MERGE_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tools.merge_datasets import main
def peak_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
before = peak_kb()
code = main(["--input", {inputs!r}, "--output-prefix", {output!r}])
print("exit", code, "growth_kb", peak_kb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from Linux /proc")
def test_merging_thousands_of_prefixes_streams_the_index(tmp_path):
    """2000 inputs of 1000 sequences: holding the merged index in memory (as a builder does,
    even in compact arrays) grows the peak RSS by ~60 MB; streaming it stays under 8 MB."""
    from megalite.data.indexed_dataset import IndexedDataset, sequence_pointers, write_index_header

    inputs, rng = tmp_path / "shards", np.random.default_rng(0)
    inputs.mkdir()
    all_lengths, all_tokens = [], []
    for k in range(2000):
        lengths = rng.integers(1, 4, 1000).astype(np.int32)
        docs = np.arange(0, 1001, 10, dtype=np.int64)  # 100 documents of 10 sequences
        tokens = ((np.arange(int(lengths.sum())) + 7 * k) % 60000).astype(np.uint16)
        tokens.tofile(str(inputs / f"part{k:05d}.bin"))
        with open(inputs / f"part{k:05d}.idx", "wb") as f:
            write_index_header(f, np.uint16, len(lengths), len(docs))
            for array in (lengths, sequence_pointers(lengths, np.uint16), docs):
                f.write(array.tobytes())
        all_lengths.append(lengths)
        all_tokens.append(tokens)
    output = str(tmp_path / "merged")
    script = MERGE_SCRIPT.format(root=ROOT, inputs=str(inputs), output=output)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "200000 documents, 2000000 sequences" in out.stdout
    exit_code, growth_kb = re.search(r"exit (\d+) growth_kb (\d+)", out.stdout).groups()
    assert exit_code == "0" and int(growth_kb) < 8 * 1024, f"peak RSS grew by {growth_kb} kB"
    merged = IndexedDataset(output)
    np.testing.assert_array_equal(merged.sequence_lengths, np.concatenate(all_lengths))
    np.testing.assert_array_equal(merged.document_indices, np.arange(0, 2_000_001, 10))
    np.testing.assert_array_equal(np.fromfile(output + ".bin", np.uint16), np.concatenate(all_tokens))
    assert merged[1000].tolist() == all_tokens[1][:all_lengths[1][0]].tolist()  # first sequence of input 1


@pytest.mark.parametrize("tool", ["build_data_cache.py", "merge_datasets.py"])
def test_data_tools_import_no_torch_and_no_training_code(tool, tmp_path):
    """As tools/preprocess_data.py (tests/test_data_preprocess.py): CPU data-prep nodes need no
    torch, and start fast."""
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "tools", tool), "--help"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    assert "megalite.data.indexed_dataset" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "triton", "transformer_engine", "flash_attn", "apex")
             or m.startswith(("megalite.training", "megalite.model", "megalite.tensor_parallel"))]
    assert not heavy, heavy


# == 7. Dataset indices built ahead of time ===================================================
def _byte_dataset(prefix: str, docs: int = 60) -> str:
    from megalite.data.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(1)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        builder.add_item(np.append(rng.integers(0, 256, int(rng.integers(5, 40))), 256))  # 256: eod
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_prebuilt_index_cache_is_loaded_by_training_and_other_settings_are_named(tmp_path, capsys, monkeypatch):
    import pretrain_gpt
    from data_fixtures import run_tool

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cache = str(tmp_path / "cache")
    # The training flags, defaults included (no --eval-interval / --eval-iters: training's are used).
    flags = without(TINY, "--mock-data", "--vocab-size", "--eval-interval", "--train-iters") + [
        "--data-path", _byte_dataset(str(tmp_path / "d")), "--tokenizer-type", "ByteTokenizer",
        "--split", "90,10,0", "--data-cache-path", cache, "--train-iters", "2"]
    built = run_tool("build_data_cache.py", *flags)
    assert built.returncode == 0, built.stderr
    assert "> built GPTDataset train indices" in built.stdout and "> built GPTDataset valid" in built.stdout
    pretrain_gpt.main(flags)
    out = capsys.readouterr().out
    assert "> loaded GPTDataset train indices" in out and "> loaded GPTDataset valid indices" in out
    assert "> built GPTDataset" not in out
    pretrain_gpt.main(flags[:-1] + ["3"])  # --train-iters 3: other sample counts than prebuilt
    out = capsys.readouterr().out
    assert re.search(r"> not using index cache \S+-GPTDataset-train-description.json: it was built for other "
                     r"settings \(num_samples: cached 16, now 24\); building new indices", out), out
    assert "> built GPTDataset train indices" in out


# == 8. MFU ===================================================================================
def test_unknown_gpu_prints_no_mfu_and_peak_tflops_overrides(monkeypatch):
    from megalite.training import monitoring
    from megalite.config import parse_args

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    gpu = torch.device("cuda", 0)

    def progress(extra=()):  # 2 x 494.5 model TFLOPs per iteration of 1 s on 2 GPUs
        mon = monitoring.TrainingMonitor(parse_args(TINY + list(extra)), enabled=False, world_size=2,
                                         flops_per_iteration=989e12, model_flops_per_iteration=989e12, device=gpu)
        return mon.progress_line(5, 1.0)
    assert "MFU" not in progress()  # not in the table: no number rather than a wrong one
    assert "MFU: 200.0% |" in progress(["--peak-tflops", "247.25"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert "MFU: 50.0% |" in progress()  # the dense bf16 peak, 989 (the sparse 1979 would give 25%)
    assert "MFU: 200.0% |" in progress(["--peak-tflops", "247.25"])  # also overrides a known device


# == 9. Hugging Face conversion ===============================================================
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")


@pytest.mark.skipif(not os.path.exists(CONVERT), reason="tools/convert_checkpoint.py not written yet")
def test_checkpoint_conversion_imports_no_training_code_and_offers_verify(tmp_path):
    """Conversion runs on a CPU box without the training loop (no process groups, schedules or
    optimizer to set up), and checks the logits itself with --verify."""
    r = subprocess.run([sys.executable, "-X", "importtime", CONVERT, "--help"], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--verify" in r.stdout
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    assert "megalite.training" not in modules and "pretrain_gpt" not in modules


def _tiny_llama(path: str) -> str:
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # norms too: a mis-mapped tensor must change the logits
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(path)
    return path


@pytest.mark.skipif(not os.path.exists(CONVERT), reason="tools/convert_checkpoint.py not written yet")
def test_conversion_verify_catches_a_wrong_layout(tmp_path, monkeypatch, capsys):
    """--verify is a real check: the correct GQA layout passes, K and V swapped in the fused
    QKV (the classic layout slip) fails the conversion instead of writing a silently wrong model."""
    pytest.importorskip("transformers")
    from megalite.interop import hf as hf_conversion
    from tools.convert_checkpoint import main as convert

    hf = _tiny_llama(str(tmp_path / "hf"))
    result = convert(["--direction", "hf-to-megalite", "--load", hf, "--save", str(tmp_path / "ok"), "--verify"])
    assert result["max_abs_diff"] <= 1e-4
    assert "> verify: max abs logit difference" in capsys.readouterr().out
    fuse = hf_conversion.fuse_qkv
    monkeypatch.setattr(hf_conversion, "fuse_qkv", lambda q, k, v, heads, groups: fuse(q, v, k, heads, groups))
    with pytest.raises(SystemExit, match=r"verify failed: logits differ by"):
        convert(["--direction", "hf-to-megalite", "--load", hf, "--save", str(tmp_path / "bad"), "--verify"])
