"""Shared helpers of the data tests: tiny tokenizers trained in a temp dir, jsonl writers,
CLI runner and an independent reference GPT-2 BPE (OpenAI's original algorithm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It barked! Did it? Yes.",
    "Hello world! It's 2024, we're testing 123 numbers and you'll see.",
    "naïve café — über Straße 東京 emoji 🙂 tabs\tand  double  spaces",
    "def foo(x):\n    return x + 1\n\n\nclass Bar:  pass",
    "Sentence one. Sentence two is longer! And a third one? Fine.",
]


def train_gpt2_bpe(directory: str, vocab_size: int = 400) -> tuple[str, str]:
    """Train a tiny byte-level BPE (with <|endoftext|>) and save GPT-2 style vocab/merges."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXTS * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    os.makedirs(directory, exist_ok=True)
    vocab, merges = tok.save_model(directory)
    return vocab, merges


def train_sentencepiece(directory: str, eos: bool = True) -> str:
    """Train a tiny sentencepiece model; ``eos=False`` disables its </s> piece."""
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "sp" if eos else "sp_noeos")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_prefix=prefix,
                                   vocab_size=120, hard_vocab_limit=False, minloglevel=2,
                                   eos_id=2 if eos else -1, character_coverage=1.0)
    return prefix + ".model"


def train_hf(directory: str, eos: bool = True) -> str:
    """Train a tiny HF tokenizer.json (BPE, whitespace pre-tokenizer); with ``eos`` a
    tokenizer_config.json naming "</s>" as eos_token is written beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "</s>"] if eos else ["<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    if eos:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "</s>"}, f)
    return path


def write_jsonl(path: str, docs, key: str = "text") -> str:
    """Write one {key: doc} json object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return path


def run_tool(script: str, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` with this interpreter; returns the completed process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


# --- reference GPT-2 BPE: OpenAI's encoder.py algorithm, independent of HF tokenizers ---

def _bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2BPE:
    """GPT-2's original byte-level BPE (regex pre-split, greedy lowest-rank merges)."""

    def __init__(self, vocab_file: str, merge_file: str):
        import regex

        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
        self.ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def _bpe(self, token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token))
        return ids
