"""SFT data: tools/preprocess_sft.py writes packed ``.bin/.idx`` files with a loss mask that trains
only the responses; training on them equals serial on a parallel layout.

* first-fit packing against a plain re-implementation (and by hand);
* prompt/response and chat encodings: the tokens with loss mask 1 decode to exactly the
  responses (assistant bodies) and their EOD;
* the tool end to end: packs of ``seq + 1`` tokens readable by megatron-core's IndexedDataset,
  every example exactly once and whole, EOD padding with mask 0, malformed lines fatal (no
  output) or skipped, over-long examples truncated;
* training: the loss counts only response tokens, and TP x PP with the packed-document flags
  equals the serial run (tests/equivalence.py).
"""
import json
import os

import numpy as np
import pytest

from data_fixtures import run_tool
from equivalence import TINY, assert_equivalent, run_layout, serial

pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")
EOD = 256  # ByteTokenizer


def _naive_first_fit(lengths, capacity):
    room, out = [], []
    for n in lengths:
        for b, r in enumerate(room):
            if r >= n:
                room[b] -= n
                out.append(b)
                break
        else:
            room.append(capacity - n)
            out.append(len(room) - 1)
    return out


def test_first_fit():
    from megalite.data.sft import first_fit

    assert first_fit([5, 4, 3, 6, 2], 8).tolist() == [0, 1, 0, 2, 1]
    rng = np.random.default_rng(0)
    for capacity in (8, 17, 100):
        lengths = rng.integers(1, capacity + 1, 300).tolist()
        bins = first_fit(lengths, capacity)
        assert bins.tolist() == _naive_first_fit(lengths, capacity)
        assert np.bincount(bins, weights=lengths).max() <= capacity
    with pytest.raises(ValueError, match="1..8 tokens"):
        first_fit([9], 8)


def _trained_text(ids, mask) -> str:
    return bytes(int(t) if t != EOD else ord("|") for t, m in zip(ids, mask) if m).decode()


def test_encodings_train_only_the_responses():
    from megalite.data.sft import encode_messages, encode_prompt_response
    from megalite.data.tokenizers import build_tokenizer

    tok = build_tokenizer("ByteTokenizer")
    ids, mask = encode_prompt_response(tok, "Q: 2+2? A: ", "4")
    assert bytes(ids[:-1].tolist()).decode() == "Q: 2+2? A: 4" and ids[-1] == EOD
    assert _trained_text(ids, mask) == "4|"
    chat = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ok"}]
    ids, mask = encode_messages(tok, chat)
    assert bytes(ids[:-1].tolist()).decode() == (
        "<|system|>\nterse\n<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nbye\n<|assistant|>\nok\n")
    assert _trained_text(ids, mask) == "yo\nok\n|"
    _, mask = encode_messages(tok, chat[:3] + chat[3:4])  # ends with the user: its EOD is not trained
    assert mask[-1] == 0
    for bad, reason in (([{"role": "user", "content": "hi"}], "no 'assistant' message"),
                        ([{"role": "bot", "content": "hi"}], "message 0 must be"), ([], "non-empty list")):
        with pytest.raises(ValueError, match=reason):
            encode_messages(tok, bad)


EXAMPLES = [{"prompt": f"{a}+{b}=", "response": f"{a + b}"} for a in range(0, 60, 3) for b in range(7, 70, 7)]
CHATS = [{"messages": [{"role": "user", "content": f"n{i}"}, {"role": "assistant", "content": f"{i}"}]}
         for i in range(6)]


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def _preprocess(tmp_path, rows, *flags, extra_lines=(), seq_length=16):
    source = _write_jsonl(tmp_path / "sft.jsonl", rows, extra_lines)
    out = str(tmp_path / "out")
    r = run_tool("preprocess_sft.py", "--input", source, "--output-prefix", out, "--seq-length", str(seq_length),
                 "--tokenizer-type", "ByteTokenizer", *flags)
    return r, out + "_sft_document"


def test_tool_packs_every_example_once_with_its_mask(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    long_response = {"prompt": "x", "response": "y" * 40}    # truncated to the 41-token pack
    long_prompt = {"prompt": "p" * 45, "response": "never"}  # no response token left: skipped
    r, prefix = _preprocess(tmp_path, EXAMPLES + CHATS + [long_response, long_prompt], seq_length=40)
    assert r.returncode == 0, r.stderr
    assert "truncated 2" in r.stdout and "1 without a response token" in r.stdout
    tokens, masks = MegatronIndexedDataset(prefix), MegatronIndexedDataset(prefix + "_loss_mask")
    assert len(tokens) == len(masks) and set(tokens.sequence_lengths) == {41}
    examples = []
    for i in range(len(tokens)):
        ids, mask = tokens[i], masks[i]
        assert mask.dtype == np.uint8
        ends = np.flatnonzero(ids == EOD).tolist()
        start = 0
        for end in ends + ([40] if ids[-1] != EOD else []):  # a truncated example fills its pack, no EOD
            if end > start:  # an example (and its EOD): its text and its trained part
                examples.append((bytes(ids[start:end + (ids[end] != EOD)].tolist()).decode(),
                                 _trained_text(ids[start:end + 1], mask[start:end + 1])))
            else:
                assert not mask[end], f"padding EOD with loss mask 1 in pack {i}"
            start = end + 1
    want = [(e["prompt"] + e["response"], e["response"] + "|") for e in EXAMPLES]
    want += [(f"<|user|>\nn{i}\n<|assistant|>\n{i}\n", f"{i}\n|") for i in range(6)]
    want += [("x" + "y" * 40, "y" * 40)]  # truncated to 41 tokens: no EOD to train
    assert sorted(examples) == sorted(want)


def test_tool_reports_bad_lines(tmp_path):
    r, prefix = _preprocess(tmp_path, EXAMPLES[:3], extra_lines=["{not json", '{"prompt": "a"}'])
    assert r.returncode == 1 and "sft.jsonl:4: invalid JSON" in r.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("out")]  # no output, not even temporary
    r, prefix = _preprocess(tmp_path, EXAMPLES[:3], "--skip-bad-lines", extra_lines=["{not json", '{"prompt": "a"}'])
    assert r.returncode == 0 and "skipped 2 bad lines" in r.stdout
    assert "sft.jsonl:5: needs string 'prompt' and 'response'" in r.stderr


def test_dataset_sample_is_a_whole_pack_with_the_label_mask(tmp_path):
    from megalite.data.sft import PackedSFTDataset, loss_mask_prefix
    from megalite.data.indexed_dataset import IndexedDataset

    _, prefix = _preprocess(tmp_path, EXAMPLES)
    packs, masks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    ds = PackedSFTDataset(prefix, np.arange(len(packs)), 3 * len(packs), "train", 16, seed=1)
    assert len(ds) == 3 * len(packs)
    index = {packs[j].tobytes(): j for j in range(len(packs))}
    assert len(index) == len(packs)  # the packs are distinct, so a sample tells which pack it is
    seen = []
    for i in range(len(ds)):
        sample = ds[i]
        j = index[sample["tokens"].astype(packs.dtype).tobytes()]
        assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].dtype == np.float32
        assert sample["loss_mask"].tolist() == masks[j][1:].tolist()  # the mask of the labels tokens[1:]
        seen.append(j)
    assert sorted(seen) == sorted(list(range(len(packs))) * 3)  # three epochs, each pack once per epoch
    with pytest.raises(ValueError, match="run tools/preprocess_sft.py with --seq-length 32"):
        PackedSFTDataset(prefix, np.arange(len(packs)), None, "train", 32, seed=1)


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft_train")
    _, prefix = _preprocess(directory, EXAMPLES * 2)
    argv = [a for a in TINY if a != "--mock-data"] + [
        "--data-path", prefix, "--tokenizer-type", "ByteTokenizer", "--split", "100,0,0",
        "--data-cache-path", str(directory / "cache"), "--reset-attention-mask", "--reset-position-ids"]
    return tuple(argv), prefix


def test_sft_training_counts_only_responses_and_matches_serial_on_tp2_pp2(sft_base):
    from megalite.config import parse_args
    from megalite.data.build import build_datasets

    base, prefix = sft_base
    ref = serial((), base)
    (train, _, _), _ = build_datasets(parse_args(list(base)), log=lambda m: None)
    response_tokens = sum(train[i]["loss_mask"].sum() for i in range(6 * 8))  # the 6 iterations' samples
    assert sum(h["tokens"] for h in ref["per_rank"][0]["history"]) == response_tokens
    assert response_tokens < 0.5 * 6 * 8 * 16  # prompts and padding are most of the tokens
    assert ref["loss"][-1] < ref["loss"][0]
    assert_equivalent(ref, run_layout(list(base) + ["--tensor-model-parallel-size", "2",
                                                    "--pipeline-model-parallel-size", "2"], 4))
