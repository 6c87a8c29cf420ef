"""Tokenizers: each type against its library / reference, eod and vocab rules, and errors."""
import json
import subprocess
import sys

import pytest

from data_fixtures import (ROOT, TEXTS, ReferenceGPT2BPE, train_gpt2_bpe, train_hf,
                           train_sentencepiece)
from megalite.data.tokenizers import build_tokenizer

SAMPLES = TEXTS + ["", " leading space", "trailing space ", "<|endoftext|> in text",
                   "it's they're I'll we've I'm he'd", "a\n\n\nb  \n c"]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    return train_gpt2_bpe(str(tmp_path_factory.mktemp("bpe")))


def test_gpt2_bpe_matches_reference_gpt2_algorithm(bpe_files):
    vocab, merges = bpe_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    ref = ReferenceGPT2BPE(vocab, merges)
    for text in SAMPLES:
        assert tok.tokenize(text) == ref.encode(text), text
        assert tok.detokenize(tok.tokenize(text)) == text
    with open(vocab) as f:
        v = json.load(f)
    assert tok.vocab_size == len(v)
    assert tok.eod == v["<|endoftext|>"]
    # "<|endoftext|>" written in text is ordinary text (GPT-2 / Megatron behaviour), not eod.
    assert tok.eod not in tok.tokenize("<|endoftext|>")
    # merges were learned: common words take fewer tokens than bytes
    assert len(tok.tokenize("The quick brown fox")) < len("The quick brown fox")


def test_gpt2_bpe_without_endoftext_has_no_eod(tmp_path):
    vocab, merges = train_gpt2_bpe(str(tmp_path))
    with open(vocab) as f:
        v = json.load(f)
    del v["<|endoftext|>"]
    with open(vocab, "w") as f:
        json.dump(v, f)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.eod is None
    with pytest.raises(ValueError, match="GPT2BPETokenizer has no end-of-document"):
        tok.require_eod()


def test_sentencepiece(tmp_path):
    import sentencepiece as spm

    model = train_sentencepiece(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=model)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == sp.get_piece_size() > 50
    assert tok.eod == sp.eos_id() == 2
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == sp.encode_as_ids(text) and len(ids) > 0
        assert tok.detokenize(ids) == sp.decode_ids(ids)
    no_eos = build_tokenizer("SentencePieceTokenizer",
                             tokenizer_model=train_sentencepiece(str(tmp_path), eos=False))
    assert no_eos.eod is None


def test_huggingface_file_and_directory(tmp_path):
    from tokenizers import Tokenizer

    path = train_hf(str(tmp_path / "hf"))
    ref = Tokenizer.from_file(path)
    for source in (path, str(tmp_path / "hf")):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=source)
        assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        assert tok.eod == ref.token_to_id("</s>") == 1
        for text in TEXTS:
            assert tok.tokenize(text) == ref.encode(text).ids
            assert tok.detokenize(tok.tokenize(text)) == text
    without = build_tokenizer("HuggingFaceTokenizer",
                              tokenizer_model=train_hf(str(tmp_path / "noeos"), eos=False))
    assert without.eod is None
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_null_tokenizer_follows_megatron():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.vocab_size == 1001 and tok.eod == 1000
    assert tok.tokenize("5 17  999\n3") == [5, 17, 999, 3]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 17, 999]) == "5 17 999"
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("5 x 7")
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("1001")


def test_byte_tokenizer():
    tok = build_tokenizer("ByteTokenizer")
    assert tok.vocab_size == 257 and tok.eod == 256
    assert tok.tokenize("hé") == [104, 195, 169]
    assert tok.tokenize_array("hé").tolist() == [104, 195, 169]
    assert tok.detokenize([104, 195, 169, 256]) == "hé"


def test_build_tokenizer_errors_name_flag_and_path(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type.*'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="requires --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=__file__)
    missing = str(tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=f"--vocab-file.*{missing}"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=missing)
    with pytest.raises(ValueError, match="requires --vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=missing)


def test_data_package_imports_no_torch_nor_tokenizer_libraries():
    code = ("import sys, megalite.data, megalite.data.tokenizers; "
            "bad = [m for m in ('torch', 'tokenizers', 'sentencepiece') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
