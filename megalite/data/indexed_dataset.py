"""Megatron-Core compatible ``.bin/.idx`` token files: reader, builder and streaming merge.

Format (docs/data.md; identical to Megatron-Core's ``IndexedDataset``):

``.idx``::

    b"MMIDIDX\\x00\\x00"       9-byte magic
    <Q  version (1)
    <B  dtype code (uint8 1, int8 2, int16 3, int32 4, int64 5, float64 6, float32 7, uint16 8)
    <Q  sequence count N
    <Q  document count D+1 (length of the document index array)
    int32[N]   sequence lengths (tokens)
    int64[N]   sequence pointers (byte offsets into .bin)
    int64[D+1] document indices (sequence index where each document starts; first 0, last N)

``.bin`` is the raw token array of every sequence back to back.

Only numpy is imported here: ``tools/preprocess_data.py`` uses this module and must not pull in
torch or training code.
"""
from __future__ import annotations

import array
import os
import shutil
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic + version + dtype code + sequence count + document count
HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8

DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Bytes copied per read when concatenating .bin files; bounds merge memory.
_COPY_CHUNK = 16 * 1024 * 1024


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated or corrupt (the message names the file)."""


def idx_path(prefix: str) -> str:
    """Path of the index file of ``prefix``."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """Path of the token file of ``prefix``."""
    return prefix + ".bin"


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Token dtype Megatron uses for a vocabulary: uint16 when ``vocab_size < 65500`` else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dtype_code(dtype) -> int:
    """The one-byte dtype code written into the ``.idx`` header."""
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in an .idx file; "
                         f"use one of {[str(d) for d in DTYPE_CODES]}") from None


def exists(prefix: str) -> bool:
    """True when both ``prefix.bin`` and ``prefix.idx`` exist."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def read_index_header(path: str) -> tuple[np.dtype, int, int]:
    """Validate the header of an ``.idx`` file and its size; return (dtype, N, D+1).

    Raises :class:`IndexedDatasetError` naming ``path`` for a bad magic, version or dtype code,
    or a file shorter than its header says (truncated index arrays).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise FileNotFoundError(f"index file not found: {path}") from None
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(f"{path}: truncated index file ({size} bytes, header alone "
                                  f"needs {HEADER_SIZE})")
    if head[:9] != INDEX_HEADER:
        raise IndexedDatasetError(f"{path}: bad magic {head[:9]!r}, expected {INDEX_HEADER!r} "
                                  f"(not a Megatron .idx file)")
    version, code, count, doc_count = struct.unpack("<QBQQ", head[9:])
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{path}: unsupported index version {version} "
                                  f"(expected {INDEX_VERSION})")
    if code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{path}: unknown dtype code {code}")
    expected = HEADER_SIZE + count * 4 + count * 8 + doc_count * 8
    # Megatron's multimodal variant appends one int8 mode per sequence; accept and ignore it.
    if size not in (expected, expected + count):
        what = "truncated" if size < expected else "has unexpected trailing bytes"
        raise IndexedDatasetError(f"{path}: index {what}: {size} bytes, but the header "
                                  f"({count} sequences, {doc_count} document indices) "
                                  f"needs {expected}")
    return CODE_DTYPES[code], count, doc_count


class IndexedDataset:
    """Zero-copy reader of a ``prefix.bin``/``prefix.idx`` pair (memory-mapped with numpy).

    ``ds[i]`` is sequence ``i`` as a read-only numpy array of the file's dtype;
    ``ds.get(i, offset, length)`` a slice of it. Files written by Megatron-Core read the same.
    The constructor checks the header, the index sizes, the document index bounds and that the
    ``.bin`` size matches the lengths, so corrupt or truncated files fail here, naming the file.
    Pickles by prefix (re-opened in the receiving process), so DataLoader workers can use it.
    """

    def __init__(self, prefix: str):
        self.path_prefix = prefix
        self._open()

    def _open(self) -> None:
        prefix = self.path_prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        missing = [p for p in (ipath, bpath) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"indexed dataset {prefix!r}: missing {', '.join(missing)}")
        dtype, count, doc_count = read_index_header(ipath)
        self.dtype = dtype
        idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(idx, np.int32, count, off)
        off += 4 * count
        self.sequence_pointers = np.frombuffer(idx, np.int64, count, off)
        off += 8 * count
        self.document_indices = np.frombuffer(idx, np.int64, doc_count, off)
        self._idx_mmap = idx
        if doc_count < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != count:
            raise IndexedDatasetError(
                f"{ipath}: corrupt document index (must start at 0 and end at the sequence "
                f"count {count}; got {self.document_indices[:1].tolist()}.."
                f"{self.document_indices[-1:].tolist()})")
        if doc_count > 1 and np.any(np.diff(self.document_indices) < 0):
            raise IndexedDatasetError(f"{ipath}: corrupt document index (not non-decreasing)")
        if count and self.sequence_lengths.min() < 0:
            raise IndexedDatasetError(f"{ipath}: corrupt index (negative sequence length)")
        itemsize = dtype.itemsize
        n_bytes = int(self.sequence_lengths.sum(dtype=np.int64)) * itemsize
        bin_size = os.path.getsize(bpath)
        if bin_size != n_bytes:
            raise IndexedDatasetError(
                f"{bpath}: size {bin_size} bytes does not match its index {ipath} "
                f"({n_bytes // itemsize} tokens of {dtype} = {n_bytes} bytes); "
                f"the files are truncated or from different runs")
        if count and (self.sequence_pointers[0] != 0 or
                      self.sequence_pointers[-1] + self.sequence_lengths[-1] * itemsize != n_bytes):
            raise IndexedDatasetError(f"{ipath}: corrupt sequence pointers")
        # numpy cannot memory-map an empty file; an empty dataset reads from an empty buffer.
        self._bin = np.memmap(bpath, np.uint8, mode="r") if bin_size else np.empty(0, np.uint8)

    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        """Number of sequences (documents, or sentences for sentence-level files)."""
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(document_indices) - 1``)."""
        return int(self.document_indices.shape[0]) - 1

    def __getitem__(self, i) -> np.ndarray:
        """Sequence ``i`` (int) as a numpy view; a contiguous slice gives a list of arrays."""
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            return [self.get(j) for j in range(start, stop)]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when length is None)."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {self.path_prefix} ({n} sequences)")
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} "
                             f"of length {seq_len}")
        ptr = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, ptr)


class IndexedDatasetBuilder:
    """Writes a ``.bin`` incrementally and its ``.idx`` on :meth:`finalize` (Megatron-Core's API).

    Lengths and document indices are held in compact ``array`` buffers (4 and 8 bytes per
    entry), not Python lists, so memory stays small for large corpora.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail early on an unsupported dtype
        self.bin_path = bin_path
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array.array("i")
        self.document_indices = array.array("q", [0])

    def add_item(self, tokens) -> None:
        """Append one sequence (list, numpy array or torch tensor of token ids)."""
        arr = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens)
        arr = arr.astype(self.dtype, copy=False).reshape(-1)
        self.data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(arr.size)

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append a whole document: ``tokens`` concatenated, split into sequences of ``lengths``."""
        arr = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens)
        arr = arr.astype(self.dtype, copy=False).reshape(-1)
        lengths = [int(x) for x in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"add_document: lengths sum to {sum(lengths)} but the document "
                             f"has {arr.size} tokens")
        self.data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def end_document(self) -> None:
        """Close the current document (for use with :meth:`add_item`)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (its index entries and its ``.bin`` bytes)."""
        ds = IndexedDataset(prefix)
        if ds.dtype != self.dtype:
            raise ValueError(f"{idx_path(prefix)}: dtype {ds.dtype} does not match the "
                             f"builder's {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(ds.sequence_lengths.tolist())
        self.document_indices.extend((ds.document_indices[1:] + offset).tolist())
        del ds
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self.data_file, _COPY_CHUNK)

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        with open(idx_path, "wb") as f:
            write_index_header(f, self.dtype, len(lengths), len(self.document_indices))
            f.write(lengths.tobytes())
            f.write(sequence_pointers(lengths, self.dtype).tobytes())
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes())

    def abort(self) -> None:
        """Close and delete the partly written ``.bin``."""
        self.data_file.close()
        if os.path.exists(self.bin_path):
            os.remove(self.bin_path)


def write_index_header(f, dtype, count: int, doc_count: int) -> None:
    """Write the 34-byte ``.idx`` header (``doc_count`` is the document index length, D+1)."""
    f.write(INDEX_HEADER)
    f.write(struct.pack("<Q", INDEX_VERSION))
    f.write(struct.pack("<B", dtype_code(dtype)))
    f.write(struct.pack("<Q", count))
    f.write(struct.pack("<Q", doc_count))


def sequence_pointers(lengths: np.ndarray, dtype, base: int = 0) -> np.ndarray:
    """Byte offset of every sequence: exclusive cumulative sum of ``lengths * itemsize``."""
    ptr = np.empty(len(lengths), dtype=np.int64)
    if len(lengths):
        ptr[0] = 0
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=ptr[1:])
    return ptr + base


def merge_indexed_datasets(prefixes: Iterable[str], output_prefix: str, log=None) -> None:
    """Concatenate datasets into ``output_prefix.bin/.idx`` with bounded memory.

    Memory does not grow with the number of inputs: the headers are read first to size the
    output index, then each index array is streamed from one input at a time (memory-mapped)
    and ``.bin`` bytes are copied in 16 MB chunks. All inputs must share a dtype. Output is
    written under temporary names and renamed at the end, so a failure leaves nothing behind.
    """
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("merge: no input datasets")
    dtype, total_seq, total_doc = None, 0, 1
    for p in prefixes:
        if not exists(p):
            raise FileNotFoundError(f"merge: missing {idx_path(p)} or {bin_path(p)}")
        d, count, doc_count = read_index_header(idx_path(p))
        if dtype is None:
            dtype, first = d, p
        elif d != dtype:
            raise ValueError(f"merge: dtype mismatch: {idx_path(p)} holds {d} but "
                             f"{idx_path(first)} holds {dtype}; preprocess all inputs with "
                             f"tokenizers of the same vocabulary size class")
        total_seq += count
        total_doc += doc_count - 1
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_bin = f"{bin_path(output_prefix)}.tmp-{os.getpid()}"
    tmp_idx = f"{idx_path(output_prefix)}.tmp-{os.getpid()}"
    try:
        with open(tmp_bin, "wb") as out:
            for n, p in enumerate(prefixes, 1):
                IndexedDataset(p)  # validates the pair before any bytes are copied
                with open(bin_path(p), "rb") as f:
                    shutil.copyfileobj(f, out, _COPY_CHUNK)
                if log and n % 100 == 0:
                    log(f"merge: copied {n}/{len(prefixes)} .bin files")
        with open(tmp_idx, "wb") as out:
            write_index_header(out, dtype, total_seq, total_doc)
            for p in prefixes:  # pass 1: lengths
                out.write(IndexedDataset(p).sequence_lengths.tobytes())
            base = 0
            for p in prefixes:  # pass 2: pointers, shifted by the bytes before this input
                ds = IndexedDataset(p)
                out.write(sequence_pointers(ds.sequence_lengths, dtype, base).tobytes())
                base += int(ds.sequence_lengths.sum(dtype=np.int64)) * dtype.itemsize
            out.write(np.zeros(1, np.int64).tobytes())
            seq_offset = 0
            for p in prefixes:  # pass 3: document indices, shifted by the sequences before
                ds = IndexedDataset(p)
                out.write((ds.document_indices[1:] + seq_offset).tobytes())
                seq_offset += len(ds)
        os.replace(tmp_bin, bin_path(output_prefix))
        os.replace(tmp_idx, idx_path(output_prefix))
    finally:
        for t in (tmp_bin, tmp_idx):
            if os.path.exists(t):
                os.remove(t)
