"""tools/preprocess_data.py end to end: every tokenizer, exact bytes, errors, workers, gzip."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import (ROOT, TEXTS, run_tool, train_gpt2_bpe, train_hf, train_sentencepiece,
                           write_jsonl)
from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.tokenizers import build_tokenizer


def preprocess(tmp_path, inp, *extra, prefix="out", tokenizer=("--tokenizer-type", "ByteTokenizer")):
    return run_tool("preprocess_data.py", "--input", str(inp), "--output-prefix",
                    str(tmp_path / prefix), *tokenizer, *extra)


@pytest.fixture(scope="module")
def tokenizer_flags(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    vocab, merges = train_gpt2_bpe(str(d / "bpe"))
    return {
        "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                 "--merge-file", merges],
        "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
               train_sentencepiece(str(d / "sp"))],
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
               train_hf(str(d / "hf"))],
        "byte": ["--tokenizer-type", "ByteTokenizer"],
    }


def _tokenizer_from_flags(flags):
    kw = dict(zip([f.lstrip("-").replace("-", "_") for f in flags[2::2]], flags[3::2]))
    return build_tokenizer(flags[1], **kw)


@pytest.mark.parametrize("name", ["gpt2", "sp", "hf", "byte"])
def test_round_trip_gives_the_tokenizer_ids(tmp_path, tokenizer_flags, name):
    flags = tokenizer_flags[name]
    inp = write_jsonl(str(tmp_path / "c.jsonl"), TEXTS)
    r = preprocess(tmp_path, inp, "--append-eod", tokenizer=flags)
    assert r.returncode == 0, r.stderr
    tok = _tokenizer_from_flags(flags)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.uint16 and len(ds) == len(TEXTS) == ds.num_documents
    for i, text in enumerate(TEXTS):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]


def test_null_tokenizer_round_trip_and_int32_for_large_vocab(tmp_path):
    docs = ["1 2 3", "70000 5", "9"]
    r = preprocess(tmp_path, write_jsonl(str(tmp_path / "c.jsonl"), docs), "--append-eod",
                   tokenizer=("--tokenizer-type", "NullTokenizer", "--vocab-size", "100000"))
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype == np.int32  # vocab 100001 >= 65500
    assert [ds[i].tolist() for i in range(3)] == [[1, 2, 3, 100000], [70000, 5, 100000],
                                                  [9, 100000]]


def test_output_bytes_equal_hand_built_megatron_files(tmp_path):
    r = preprocess(tmp_path, write_jsonl(str(tmp_path / "c.jsonl"), ["ab", "", "c"]),
                   "--append-eod")
    assert r.returncode == 0, r.stderr
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3) + struct.pack("<2i", 3, 2)
           + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2))
    with open(tmp_path / "out_text_document.idx", "rb") as f:
        assert f.read() == idx
    with open(tmp_path / "out_text_document.bin", "rb") as f:
        assert f.read() == struct.pack("<5H", 97, 98, 256, 99, 256)
    # the empty document is skipped and counted
    assert "skipped 1 (0 bad lines, 1 empty)" in r.stdout


def test_workers_1_and_2_byte_identical(tmp_path, tokenizer_flags):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "the", "fox.", "Hello!", "123", "東京"]
    docs = [" ".join(rng.choice(words, rng.integers(0, 40))) for _ in range(1500)]
    inp = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    for w in ("1", "2"):
        r = preprocess(tmp_path, inp, "--append-eod", "--workers", w, "--log-interval", "500",
                       prefix=f"w{w}", tokenizer=tokenizer_flags["gpt2"])
        assert r.returncode == 0, r.stderr
        assert "Processed 1000 documents" in r.stderr and "docs/s" in r.stderr
        assert "MB/s" in r.stderr
    for suffix in (".bin", ".idx"):
        with open(tmp_path / f"w1_text_document{suffix}", "rb") as a, \
                open(tmp_path / f"w2_text_document{suffix}", "rb") as b:
            assert a.read() == b.read()
    assert len(IndexedDataset(str(tmp_path / "w2_text_document"))) == sum(1 for d in docs if d)


BAD_LINES = [
    json.dumps({"text": "good one"}),
    json.dumps({"text": "good two"}),
    '{"text": "unterminated',
    json.dumps({"other": "x"}),
    json.dumps({"text": 5}),
    json.dumps({"text": "good three"}),
    "[1, 2]",
]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_line_is_fatal_by_default_and_leaves_no_files(tmp_path, workers):
    inp = tmp_path / "corpus.jsonl"
    inp.write_text("\n".join(BAD_LINES) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    r = run_tool("preprocess_data.py", "--input", str(inp), "--output-prefix",
                 str(out / "o"), "--tokenizer-type", "ByteTokenizer", "--workers", workers)
    assert r.returncode == 1
    assert "corpus.jsonl:3: invalid JSON" in r.stderr
    assert os.listdir(out) == []


def test_skip_bad_lines_counts_and_reports_each(tmp_path):
    inp = tmp_path / "corpus.jsonl"
    inp.write_text("\n".join(BAD_LINES) + "\n\n")
    r = preprocess(tmp_path, inp, "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    for line, reason in [(3, "invalid JSON"), (4, "missing key 'text'"),
                         (5, "value of 'text' is int"), (7, "expected a JSON object")]:
        assert f"corpus.jsonl:{line}: {reason}" in r.stderr
    assert "read 7 documents, skipped 4 (4 bad lines, 0 empty), ignored 1 blank lines" in r.stdout
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [bytes(ds[i].astype(np.uint8)).decode() for i in range(len(ds))] == \
        ["good one", "good two", "good three"]


def test_invalid_utf8_and_untokenizable_lines(tmp_path):
    inp = tmp_path / "c.jsonl"
    inp.write_bytes(b'{"text": "1 2"}\n{"text": "\xff\xfe"}\n{"text": "3 x"}\n')
    r = preprocess(tmp_path, inp, "--skip-bad-lines",
                   tokenizer=("--tokenizer-type", "NullTokenizer", "--vocab-size", "10"))
    assert r.returncode == 0, r.stderr
    assert "c.jsonl:2: invalid UTF-8" in r.stderr and "c.jsonl:3: cannot tokenize" in r.stderr
    assert IndexedDataset(str(tmp_path / "out_text_document"))[0].tolist() == [1, 2]


def test_gzip_input_equals_plain(tmp_path):
    plain = write_jsonl(str(tmp_path / "c.jsonl"), TEXTS * 3)
    with open(plain, "rb") as f, gzip.open(tmp_path / "c.jsonl.gz", "wb") as g:
        g.write(f.read())
    assert preprocess(tmp_path, plain, "--append-eod", prefix="p").returncode == 0
    r = preprocess(tmp_path, tmp_path / "c.jsonl.gz", "--append-eod", prefix="g")
    assert r.returncode == 0, r.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"p_text_document{suffix}").read_bytes() == \
            (tmp_path / f"g_text_document{suffix}").read_bytes()


def test_split_sentences_and_multiple_keys(tmp_path):
    inp = tmp_path / "c.jsonl"
    inp.write_text(json.dumps({"text": "One. Two! Three?", "title": "T"}) + "\n"
                   + json.dumps({"text": "Single", "title": ""}) + "\n")
    r = preprocess(tmp_path, inp, "--split-sentences", "--append-eod", "--json-keys", "text",
                   "title")
    assert r.returncode == 0, r.stderr
    text = IndexedDataset(str(tmp_path / "out_text_sentence"))
    assert text.document_indices.tolist() == [0, 3, 4]
    assert [bytes(text[i].astype(np.uint8)).decode("latin-1") for i in range(4)] == \
        ["One.", "Two!", "Three?\x00", "Single\x00"]  # eod 256 -> low byte 0 in uint8 view
    assert text[2].tolist()[-1] == 256
    title = IndexedDataset(str(tmp_path / "out_title_sentence"))
    assert title.num_documents == 1 and title[0].tolist() == [ord("T"), 256]


def test_append_eod_without_eod_token_is_a_clear_error(tmp_path):
    model = train_sentencepiece(str(tmp_path / "sp"), eos=False)
    r = preprocess(tmp_path, write_jsonl(str(tmp_path / "c.jsonl"), TEXTS), "--append-eod",
                   tokenizer=("--tokenizer-type", "SentencePieceTokenizer",
                              "--tokenizer-model", model))
    assert r.returncode == 1
    assert "SentencePieceTokenizer has no end-of-document token" in r.stderr
    assert not os.path.exists(tmp_path / "out_text_document.bin")


def test_missing_input_and_tokenizer_file_errors(tmp_path):
    r = preprocess(tmp_path, tmp_path / "nope.jsonl")
    assert r.returncode == 1 and "--input: file not found" in r.stderr
    r = preprocess(tmp_path, write_jsonl(str(tmp_path / "c.jsonl"), TEXTS),
                   tokenizer=("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                              str(tmp_path / "v.json"), "--merge-file", "m.txt"))
    assert r.returncode == 1 and f"--vocab-file: file not found: {tmp_path / 'v.json'}" in r.stderr


def test_tool_imports_no_torch_and_no_training_code(tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "tools",
                        "preprocess_data.py"), "--help"], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and "--json-keys" in r.stdout
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()]
    assert "megalite.data.indexed_dataset" in modules
    assert not [m for m in modules if m.split(".")[0] == "torch" or m.startswith("megalite.training")]
