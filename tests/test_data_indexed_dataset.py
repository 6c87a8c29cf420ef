""".bin/.idx format: exact bytes, reader, corruption errors, builder API and merging."""
import os
import pickle
import struct

import numpy as np
import pytest

from data_fixtures import run_tool
from megalite.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder,
                                           IndexedDatasetError, merge_indexed_datasets,
                                           optimal_dtype)


def expected_idx(code, lengths, itemsize, doc_indices, modes=b""):
    """The .idx bytes of Megatron-Core's _IndexWriter, spelled out with struct."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    out += struct.pack(f"<{len(lengths)}q", *pointers)
    out += struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    return out + modes


def build(prefix, docs, dtype=np.uint16):
    """docs: list of documents, each a list of sequences (lists of ids)."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(seq)
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


DOCS = [[[1, 2, 3]], [[4, 5], [6]], [[7, 8, 9, 10]]]


@pytest.mark.parametrize("dtype,code,fmt", [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_builder_writes_megatron_bytes(tmp_path, dtype, code, fmt):
    prefix = build(str(tmp_path / "d"), DOCS, dtype)
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == expected_idx(code, [3, 2, 1, 4], itemsize, [0, 1, 3, 4])
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == struct.pack(f"<10{fmt}", *range(1, 11))


def test_optimal_dtype_threshold():
    assert optimal_dtype(257) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(None) == np.int32


def test_reader_reads_megatron_written_files(tmp_path):
    # Files written byte by byte as Megatron-Core would, including the multimodal mode bytes.
    prefix = str(tmp_path / "m")
    with open(prefix + ".idx", "wb") as f:
        f.write(expected_idx(8, [3, 2, 1, 4], 2, [0, 1, 3, 4], modes=b"\x00" * 4))
    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<10H", *range(1, 11)))
    ds = IndexedDataset(prefix)
    assert len(ds) == 4 and ds.num_documents == 3 and ds.dtype == np.uint16
    assert ds.sequence_lengths.tolist() == [3, 2, 1, 4]
    assert ds.document_indices.tolist() == [0, 1, 3, 4]
    assert [ds[i].tolist() for i in range(4)] == [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    assert ds[-1].tolist() == [7, 8, 9, 10]
    assert ds.get(3, 1, 2).tolist() == [8, 9] and ds.get(3, 2).tolist() == [9, 10]
    assert [a.tolist() for a in ds[1:3]] == [[4, 5], [6]]
    # zero copy: a read-only view into the memory map
    arr = ds[0]
    assert not arr.flags.owndata and not arr.flags.writeable
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3].tolist() == [7, 8, 9, 10]


def test_empty_dataset(tmp_path):
    prefix = build(str(tmp_path / "e"), [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0


def corrupt(tmp_path, edit):
    prefix = build(str(tmp_path / "c"), DOCS)
    edit(prefix)
    return prefix


@pytest.mark.parametrize("edit,match,suffix", [
    (lambda p: _patch(p + ".idx", 0, b"XXIDIDX\x00\x00"), "bad magic", ".idx"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "unsupported index version", ".idx"),
    (lambda p: _patch(p + ".idx", 17, b"\x09"), "unknown dtype code 9", ".idx"),
    (lambda p: _truncate(p + ".idx", -8), "index truncated", ".idx"),
    (lambda p: _truncate(p + ".idx", 20), "truncated index file", ".idx"),
    (lambda p: _truncate(p + ".bin", -2), "does not match its index", ".bin"),
    (lambda p: _append(p + ".bin", b"\x00\x00"), "does not match its index", ".bin"),
    (lambda p: _patch(p + ".idx", 34 + 16 + 32, struct.pack("<q", 5)), "corrupt document index",
     ".idx"),
])
def test_corrupt_files_fail_naming_the_file(tmp_path, edit, match, suffix):
    prefix = corrupt(tmp_path, edit)
    with pytest.raises(IndexedDatasetError, match=match) as e:
        IndexedDataset(prefix)
    assert prefix + suffix in str(e.value)


def test_missing_files(tmp_path):
    prefix = build(str(tmp_path / "d"), DOCS)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"d\.bin"):
        IndexedDataset(prefix)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, n):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size + n if n < 0 else n)


def _append(path, data):
    with open(path, "ab") as f:
        f.write(data)


def test_builder_add_document_and_add_index(tmp_path):
    a = build(str(tmp_path / "a"), DOCS)
    b = IndexedDatasetBuilder(str(tmp_path / "ab.bin"), dtype=np.uint16)
    b.add_document([11, 12, 13], [2, 1])
    b.add_index(a)
    b.finalize(str(tmp_path / "ab.idx"))
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert ds.sequence_lengths.tolist() == [2, 1, 3, 2, 1, 4]
    assert ds.document_indices.tolist() == [0, 2, 3, 5, 6]
    assert ds[2].tolist() == [1, 2, 3] and ds[5].tolist() == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="lengths sum"):
        b2 = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
        b2.add_document([1, 2], [3])


def test_merge_streams_and_matches_builder(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = []
    for k in range(5):
        docs = [[rng.integers(0, 60000, rng.integers(1, 50)).tolist()
                 for _ in range(rng.integers(1, 4))] for _ in range(rng.integers(0, 20))]
        prefixes.append(build(str(tmp_path / f"part{k}"), docs))
    merge_indexed_datasets(prefixes, str(tmp_path / "out" / "merged"))
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in prefixes:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        with open(str(tmp_path / "out" / "merged") + suffix, "rb") as f1, \
                open(str(tmp_path / "ref") + suffix, "rb") as f2:
            assert f1.read() == f2.read()
    merged = IndexedDataset(str(tmp_path / "out" / "merged"))
    expect = [IndexedDataset(p)[i].tolist() for p in prefixes for i in range(len(IndexedDataset(p)))]
    assert [merged[i].tolist() for i in range(len(merged))] == expect
    assert merged.num_documents == sum(IndexedDataset(p).num_documents for p in prefixes)
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def test_merge_cli_directory_and_dtype_mismatch(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    build(str(shards / "b"), DOCS[1:])
    build(str(shards / "a"), DOCS[:1])
    r = run_tool("merge_datasets.py", "--input", str(shards), "--output-prefix",
                 str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    assert "3 documents" in r.stdout
    build(str(tmp_path / "wide"), DOCS, dtype=np.int32)
    r = run_tool("merge_datasets.py", "--input", str(shards / "a"), str(tmp_path / "wide"),
                 "--output-prefix", str(tmp_path / "bad"))
    assert r.returncode == 1
    assert "dtype mismatch" in r.stderr and "wide.idx" in r.stderr
    assert not os.path.exists(str(tmp_path / "bad.bin"))
