"""Tokenizers chosen by ``--tokenizer-type``; heavy libraries are imported inside the classes.

Every tokenizer exposes ``vocab_size``, ``eod`` (``None`` when it has no end-of-document token),
``tokenize(text) -> list[int]``, ``detokenize(ids) -> str`` and ``tokenize_array(text)`` (a numpy
array; faster for the byte tokenizer). Only numpy is imported at module level so that
``tools/preprocess_data.py`` stays free of torch.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
                   "NullTokenizer", "ByteTokenizer")
# Megatron's name for the GPT flavour of the sentencepiece tokenizer, accepted as an alias.
_ALIASES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}


class Tokenizer:
    """Interface shared by all tokenizers."""

    name = "Tokenizer"

    @property
    def vocab_size(self) -> int:
        """Number of token ids (every id is in ``[0, vocab_size)``)."""
        raise NotImplementedError

    @property
    def eod(self) -> Optional[int]:
        """End-of-document id, or None when the tokenizer has none."""
        return None

    def require_eod(self) -> int:
        """The eod id; raises ValueError naming the tokenizer when it has none."""
        if self.eod is None:
            raise ValueError(f"{self.name} has no end-of-document token "
                             f"(needed by --append-eod)")
        return self.eod

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        raise NotImplementedError

    def tokenize_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int64 numpy array."""
        return np.asarray(self.tokenize(text), dtype=np.int64)

    def detokenize(self, ids) -> str:
        """Text of token ``ids``."""
        raise NotImplementedError


def _import(module: str, flag_user: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{flag_user} needs the '{module}' package: pip install {module}") from None


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (HF ``tokenizers`` backend).

    Matches GPT-2's tokenizer: byte-level pre-tokenizer with GPT-2's regex, no prefix space,
    no special-token handling in text ("<|endoftext|>" in text is BPE-encoded, as in
    Megatron's GPT2Tokenizer). ``eod`` is the id of ``<|endoftext|>`` (None if absent).
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        tokenizers = _import("tokenizers", "GPT2BPETokenizer")
        from tokenizers import decoders, models, pre_tokenizers

        bpe = models.BPE.from_file(vocab_file, merge_file)
        self._tok = tokenizers.Tokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        with open(vocab_file, encoding="utf-8") as f:
            self._vocab = json.load(f)
        self._eod = self._vocab.get("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> Optional[int]:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file, as Megatron's GPTSentencePieceTokenizer.

    ``vocab_size`` is the model's piece count, ``eod`` its ``</s>`` (eos) id, None if disabled.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str):
        spm = _import("sentencepiece", "SentencePieceTokenizer")
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        eos = self._sp.eos_id()
        self._eod = eos if eos >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> Optional[int]:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode_ids([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A local HF ``tokenizer.json`` (file, or a directory containing one); never the hub.

    Like Megatron's HuggingFaceTokenizer, ``tokenize`` adds the tokenizer's own special tokens
    (its post-processor, e.g. a BOS) and ``vocab_size`` counts added tokens. ``eod`` is the
    ``eos_token`` of a ``tokenizer_config.json`` beside the file when present, else the first of
    the usual end tokens found in the vocabulary, else None.
    """

    name = "HuggingFaceTokenizer"
    _EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")

    def __init__(self, path: str):
        tokenizers = _import("tokenizers", "HuggingFaceTokenizer")
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--tokenizer-model: no tokenizer.json at {file}")
        self._tok = tokenizers.Tokenizer.from_file(file)
        self._eod = self._find_eos(os.path.dirname(file))

    def _find_eos(self, directory: str) -> Optional[int]:
        config = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # serialized AddedToken
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                return self._tok.token_to_id(eos)
        for token in self._EOS_CANDIDATES:
            if self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> Optional[int]:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids (Megatron's NullTokenizer).

    As in Megatron, ``vocab_size`` is the given size + 1 and ``eod`` is the given size.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        self._n = int(vocab_size)
        if self._n <= 0:
            raise ValueError(f"--vocab-size must be positive for NullTokenizer, got {vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError as e:
            raise ValueError(f"NullTokenizer expects whitespace-separated integers: {e}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOD 256 (vocab_size 257). Needs no files."""

    name = "ByteTokenizer"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _need(value, flag: str, tokenizer_type: str, is_file: bool = True):
    if value is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} requires {flag}")
    if is_file and not os.path.exists(value):
        raise FileNotFoundError(f"{flag}: file not found: {value}")
    return value


def build_tokenizer(tokenizer_type: str, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """Build the tokenizer named by ``--tokenizer-type`` from its flags.

    GPT2BPETokenizer needs ``--vocab-file`` and ``--merge-file``; SentencePieceTokenizer and
    HuggingFaceTokenizer ``--tokenizer-model``; NullTokenizer ``--vocab-size``; ByteTokenizer
    nothing. An unknown type or a missing flag raises ValueError, a missing file
    FileNotFoundError; both name the flag (and the path).
    """
    t = _ALIASES.get(tokenizer_type, tokenizer_type)
    if t == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_need(vocab_file, "--vocab-file", t),
                                _need(merge_file, "--merge-file", t))
    if t == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_need(tokenizer_model, "--tokenizer-model", t))
    if t == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_need(tokenizer_model, "--tokenizer-model", t))
    if t == "NullTokenizer":
        return NullTokenizer(_need(vocab_size, "--vocab-size", t, is_file=False))
    if t == "ByteTokenizer":
        return ByteTokenizer()
    raise ValueError(f"--tokenizer-type: unknown tokenizer {tokenizer_type!r}; "
                     f"choose one of {', '.join(TOKENIZER_TYPES)}")
