"""tools/generate.py: greedy and seeded sampling from a checkpoint, identical at TP=1 and TP=2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed_helper import run_distributed
from equivalence import run_layout as train

from tools import generate as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 257  # mock data over the byte tokenizer's ids, so --prompt text works too
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--max-position-embeddings", "24"]
PROMPT = [10, 13, 16, 19, 22]
NEW = 12  # prompt + new tokens run past the 24 learned positions: the context window slides


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("gen") / "ckpt")
    run = train(MODEL + ["--mock-data", "--vocab-size", str(VOCAB), "--micro-batch-size", "4", "--train-iters", "20",
                         "--lr", "1e-2", "--eval-interval", "0", "--log-interval", "5",
                         "--tensor-model-parallel-size", "2", "--save", save], 2)
    assert run["loss"][-1] < run["loss"][0]
    return save


def _main_on_ranks(rank, world, argv):
    return gen.main(argv)


def _reference_greedy(save, prompt, steps):
    """Greedy decoding with the model loaded by the training loader (checkpointing.load_checkpoint)."""
    from megalite.checkpointing import load_checkpoint
    from megalite.config import parse_args
    from megalite.parallel_state import ParallelState
    from megalite.training import Trainer
    trainer = Trainer(parse_args(MODEL + ["--mock-data", "--vocab-size", str(VOCAB)]), ParallelState.from_sizes(),
                      VOCAB, log=lambda msg: None)
    load_checkpoint(trainer, save, finetune=True, log=lambda msg: None)
    model, tokens = trainer.model[0].eval(), list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens[-24:]]))[0, -1, :VOCAB]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def _local(save):
    from megalite.parallel_state import single_process_state
    ps = single_process_state()
    model, vocab, _ = gen.load_model(save, ps)
    return lambda **kw: gen.generate(model, ps, vocab, PROMPT, NEW, **kw)


def test_greedy_is_identical_at_tp1_tp2_and_to_a_reference_loop(ckpt):
    run = _local(ckpt)
    tp1 = run(greedy=True)
    assert len(tp1) == NEW and all(0 <= t < VOCAB for t in tp1)
    assert tp1 == _reference_greedy(ckpt, PROMPT, NEW)
    argv = ["--load", ckpt, "--prompt-ids", *map(str, PROMPT), "--max-new-tokens", str(NEW), "--greedy"]
    tp2 = run_distributed(_main_on_ranks, 2, argv + ["--tensor-model-parallel-size", "2"], timeout=240)
    assert tp2 == [tp1, tp1]
    assert run(top_k=1, seed=5) == tp1 and run(top_p=1e-9, seed=5) == tp1  # a support of one token is greedy


def test_sampling_is_reproducible_with_a_seed(ckpt):
    run = _local(ckpt)
    a = run(top_k=50, top_p=0.95, temperature=1.5, seed=7)
    assert a == run(top_k=50, top_p=0.95, temperature=1.5, seed=7)
    assert a != run(top_k=50, top_p=0.95, temperature=1.5, seed=8)
    assert a != run(greedy=True)
    argv = ["--load", ckpt, "--prompt-ids", *map(str, PROMPT), "--max-new-tokens", str(NEW), "--top-k", "50",
            "--top-p", "0.95", "--temperature", "1.5", "--seed", "7", "--tensor-model-parallel-size", "2"]
    assert run_distributed(_main_on_ranks, 2, argv, timeout=240) == [a, a]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15]))
    g = torch.Generator().manual_seed(0)
    assert {gen.next_token(logits, False, 1.0, 2, 1.0, g) for _ in range(200)} == {1, 3}
    assert {gen.next_token(logits, False, 1.0, 0, 0.6, g) for _ in range(200)} == {1, 3}  # 0.4 < 0.6 <= 0.7
    assert {gen.next_token(logits, False, 1.0, 0, 0.75, g) for _ in range(300)} == {1, 3, 4}
    assert gen.next_token(logits, True, 1.0, 0, 1.0, g) == 1
    counts = torch.bincount(torch.tensor([gen.next_token(logits, False, 1e-3, 0, 1.0, g) for _ in range(50)]))
    assert counts.argmax() == 1 and counts[1] == 50  # temperature -> 0: greedy


def test_command_line_with_text_prompt(ckpt):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", ckpt, "--prompt", "abc",
           "--max-new-tokens", "6", "--greedy", "--output-ids"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids["prompt_ids"] == [97, 98, 99]  # ByteTokenizer
    # The reference's 6 greedy tokens, cut right after its first EOD (256), where generate.py stops.
    ref = _reference_greedy(ckpt, [97, 98, 99], 6)
    stop = next((i + 1 for i, t in enumerate(ref) if t == 256), len(ref))
    assert ids["generated_ids"] == ref[:stop] and len(ids["generated_ids"]) >= 1
    assert out.stdout.startswith("abc")
