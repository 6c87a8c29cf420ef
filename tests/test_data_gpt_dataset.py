"""GPTDataset / BlendedDataset / sampler / mock / built-in corpus against Megatron's algorithms.

The ``ref_*`` functions are literal Python ports of Megatron-Core's helpers.cpp loops and
gpt_dataset.py code, used as independent references for the vectorised implementations.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import ROOT, run_tool
from megalite.data import (BlendedDataset, GPTDataset, IndexedDataset, IndexedDatasetBuilder,
                           MegatronPretrainingSampler, MockGPTDataset,
                           build_train_valid_test_datasets, builtin_corpus_prefix,
                           train_valid_test_num_samples)
from megalite.data import index_builders as ib


def ref_build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch,
                         drop_last=True, extra=1):
    if drop_last:
        num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    else:
        num_samples = math.ceil(float(np.float32(num_epochs * tokens_per_epoch - extra)
                                      / np.float32(seq_length)))
    out = [(0, 0)]
    d, off = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            length = sizes[doc_idx[d]] - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - extra
                remaining = 0
            else:
                if d == len(doc_idx) - 1:
                    off = sizes[doc_idx[d]] - extra
                    break
                d += 1
                off = 0
        out.append((d, off))
    return np.array(out)


def ref_document_index(documents, num_epochs, rng, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.mgrid[0:num_epochs, 0:len(documents)][1]
        document_index[:] = documents
        document_index = document_index.reshape(-1).astype(np.int32)
        rng.shuffle(document_index)
        return document_index
    first = ref_document_index(documents, num_epochs - 1, rng, False)
    last = ref_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def ref_blending(weights, size):
    counts = [0] * len(weights)
    di, dsi = [], []
    for i in range(size):
        x = max(float(i), 1.0)
        errs = [w * x - c for w, c in zip(weights, counts)]
        j = int(np.argmax(errs))  # first maximum, as the C++ strict '>' scan
        di.append(j)
        dsi.append(counts[j])
        counts[j] += 1
    return np.array(di), np.array(dsi)


@pytest.mark.parametrize("drop_last,extra", [(True, 1), (False, 1), (True, 0), (False, 0)])
def test_sample_index_equals_cpp_loop(drop_last, extra):
    rng = np.random.default_rng(1)
    for trial in range(30):
        sizes = rng.integers(0, 40, rng.integers(1, 30)).astype(np.int32)
        sizes[rng.integers(0, len(sizes))] += 2  # at least a couple of tokens per epoch
        epochs = int(rng.integers(1, 4))
        doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        tpe = int(sizes.sum())
        seq = int(rng.integers(2, 20))
        if (epochs * tpe - extra) // seq < 1:
            continue
        got = ib.build_sample_index(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
        want = ref_build_sample_idx(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        assert got.dtype == np.int32


def test_document_index_and_blending_equal_references():
    docs = np.arange(3, 40, dtype=np.int32)
    for epochs, sep in [(1, False), (3, False), (3, True)]:
        np.testing.assert_array_equal(
            ib.build_document_index(docs, epochs, np.random.RandomState(7), sep),
            ref_document_index(docs, epochs, np.random.RandomState(7), sep))
    for weights in ([0.3, 0.7], [0.2, 0.2, 0.6], [0.5, 0.5], [0.1] * 10):
        di, dsi = ib.build_blending_indices(weights, 3000)
        rdi, rdsi = ref_blending(weights, 3000)
        np.testing.assert_array_equal(di, rdi)
        np.testing.assert_array_equal(dsi, rdsi)
        assert di.dtype == np.int16 and dsi.dtype == np.int64


def test_split_parsing_matches_megatron():
    assert ib.split_matrix(ib.parse_split("969,30,1"))[2] == pytest.approx((0.999, 1.0))
    assert ib.split_matrix(ib.parse_split("99,1,0"))[2] is None
    assert ib.split_matrix(ib.parse_split("100"))[1:] == [None, None]
    sizes = [None if x is None else len(x)
             for x in ib.split_indices(ib.split_matrix(ib.parse_split("969,30,1")), 1000)]
    assert sizes == [969, 30, 1]
    assert ib.parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert ib.parse_blend(["a", "b"]) == (["a", "b"], None)
    assert ib.sizes_per_dataset([0.25, 0.75], 1000, 0.005) == [252, 754]


def test_num_samples_like_megatron():
    assert train_valid_test_num_samples(100, 8, 50, 2) == (800, 48, 16)
    assert train_valid_test_num_samples(10, 4, None, 3) == (40, 0, 12)


def make_dataset(path, n_docs, lo=0, hi=250, seed=0, min_len=1, max_len=60):
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(path + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        b.add_item(rng.integers(lo, hi, rng.integers(min_len, max_len)))
        b.end_document()
    b.finalize(path + ".idx")
    return path


def test_samples_are_slices_of_the_shuffled_document_stream(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 200)
    seq = 16
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "80,15,5", seq, 1234, (500, 40, 10), str(tmp_path / "cache"), log=lambda s: None)
    indexed = IndexedDataset(prefix)
    for ds, (beg, end) in [(train, (0, 160)), (valid, (160, 190)), (test, (190, 200))]:
        assert isinstance(ds, GPTDataset)
        assert set(np.unique(ds.document_index)) == set(range(beg, end))
        stream = np.concatenate([indexed[d] for d in ds.document_index]).astype(np.int64)
        for i in range(len(ds)):
            j = int(ds.shuffle_index[i])
            sample = ds[i]
            assert sample.dtype == np.int64 and sample.shape == (seq + 1,)
            np.testing.assert_array_equal(sample, stream[j * seq: j * seq + seq + 1])
    assert len(train) >= 500 and len(valid) >= 40 and len(test) >= 10
    # 500 samples need several epochs of the 160 training documents
    tokens = int(indexed.sequence_lengths[:160].sum())
    assert len(train.document_index) == 160 * math.ceil((500 * seq + 1) / tokens)
    assert sorted(train.shuffle_index.tolist()) == list(range(len(train)))


def test_split_with_zero_weight_is_none_and_cache_is_reused(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 50)
    logs = []
    args = ([prefix], "100,0,0", 8, 1, (100, 10, 10), str(tmp_path / "c"))
    train, valid, test = build_train_valid_test_datasets(*args, log=logs.append)
    assert valid is None and test is None and len(train) >= 100
    assert any("built GPTDataset train" in s for s in logs)
    logs.clear()
    again, _, _ = build_train_valid_test_datasets(*args, log=logs.append)
    assert any("loaded GPTDataset train" in s for s in logs)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(train, name), getattr(again, name))
    assert not [f for f in os.listdir(tmp_path / "c") if ".tmp" in f]
    other, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", 8, 2, (100, 10, 10),
                                                  str(tmp_path / "c"), log=logs.append)
    assert not np.array_equal(other.shuffle_index, train.shuffle_index)
    assert len([f for f in os.listdir(tmp_path / "c") if f.endswith("description.json")]) == 2


def test_cache_built_for_other_settings_is_refused(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 50)
    cache = str(tmp_path / "c")
    seed1, _, _ = build_train_valid_test_datasets([prefix], "1", 8, 1, (60, 0, 0), cache,
                                                  log=lambda s: None)
    seed2, _, _ = build_train_valid_test_datasets([prefix], "1", 8, 2, (60, 0, 0), cache,
                                                  log=lambda s: None)
    # Plant the seed-1 arrays and description under the seed-2 cache names.
    files = os.listdir(cache)
    h1, h2 = seed1.description_hash, seed2.description_hash
    for f in files:
        if f.startswith(h1):
            os.replace(os.path.join(cache, f), os.path.join(cache, f.replace(h1, h2)))
    logs = []
    again, _, _ = build_train_valid_test_datasets([prefix], "1", 8, 2, (60, 0, 0), cache,
                                                  log=logs.append)
    assert any("built for other settings" in s for s in logs)
    np.testing.assert_array_equal(again.shuffle_index, seed2.shuffle_index)
    assert not np.array_equal(again.shuffle_index, seed1.shuffle_index)


def test_blending_weights_sizes_and_sources(tmp_path):
    a = make_dataset(str(tmp_path / "a"), 300, lo=0, hi=100, seed=1)
    b = make_dataset(str(tmp_path / "b"), 300, lo=100, hi=200, seed=2)
    c = make_dataset(str(tmp_path / "c"), 300, lo=200, hi=300, seed=3)
    n = 3000
    train, valid, test = build_train_valid_test_datasets(
        ["2", a, "5", b, "3", c], "90,10,0", 8, 42, (n, 100, 0), str(tmp_path / "cache"),
        log=lambda s: None)
    assert test is None
    assert isinstance(train, BlendedDataset)
    weights = [0.2, 0.5, 0.3]
    assert len(train) == sum(math.ceil(n * w) for w in weights)
    # each component built with ceil(ceil(n * w) * 1.005) samples, as Megatron-Core
    for d, w in zip(train.datasets, weights):
        assert d.num_samples == math.ceil(math.ceil(n * w) * 1.005)
    counts = np.zeros(3)
    for i in range(len(train)):
        sample = train[i]
        source = int(sample[0]) // 100
        assert source == int(train.dataset_index[i])
        assert np.all(sample // 100 == source)  # all tokens from that dataset
        counts[source] += 1
    np.testing.assert_allclose(counts / len(train), weights, atol=0.01)
    # every prefix of the blend follows the weights closely (greedy interleave)
    first = np.bincount(np.asarray(train.dataset_index[:100]), minlength=3)
    np.testing.assert_allclose(first / 100, weights, atol=0.02)


def test_concurrent_builders_share_the_cache(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 300)
    code = ("import sys, numpy as np; from megalite.data import build_train_valid_test_datasets as b; "
            f"t = b(['1', {prefix!r}], '9,1,0', 8, 3, (5000, 100, 0), {str(tmp_path / 'c')!r}, "
            "log=lambda s: None)[0]; "
            "print(int(np.asarray(t.dataset_sample_index).sum()), t.datasets[0].shuffle_index[:5].tolist())")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    logs = []
    build_train_valid_test_datasets(["1", prefix], "9,1,0", 8, 3, (5000, 100, 0),
                                    str(tmp_path / "c"), log=logs.append)
    assert logs and all("loaded" in s for s in logs)
    assert not [f for f in os.listdir(tmp_path / "c") if ".tmp" in f]


def test_empty_split_is_none_with_a_warning(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 10)
    logs = []
    train, valid, test = build_train_valid_test_datasets([prefix], "969,30,1", 4, 1, (20, 4, 4),
                                                         str(tmp_path / "c"), log=logs.append)
    # round(0.969 * 10) = 10: valid and test get no documents
    assert len(train) >= 20 and valid is None and test is None
    assert any("valid split" in s and "no documents" in s for s in logs)


def ref_sampler(total, consumed, mbs, rank, dp, drop_last=True):
    batch = []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == mbs * dp:
            yield batch[rank * mbs:(rank + 1) * mbs]
            batch = []
    if batch and not drop_last:
        yield batch[rank * mbs:(rank + 1) * mbs]


def test_sampler_matches_megatron_and_resumes():
    for drop_last in (True, False):
        for rank in range(3):
            s = MegatronPretrainingSampler(101, 0, 4, rank, 3, drop_last)
            assert list(s) == list(ref_sampler(101, 0, 4, rank, 3, drop_last))
    full = list(MegatronPretrainingSampler(100, 0, 2, 1, 2))
    assert full[0] == [2, 3] and full[1] == [6, 7] and len(full) == 25
    # resume after 56 consumed samples = 14 blocks of micro_batch 2 x dp 2
    resumed = list(MegatronPretrainingSampler(100, 56, 2, 1, 2))
    assert resumed == full[14:]
    with pytest.raises(ValueError, match="no samples left"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)


def test_mock_dataset_is_deterministic_per_index():
    a = MockGPTDataset(50, 32, 1000, seed=5)
    b = MockGPTDataset(50, 32, 1000, seed=5)
    assert len(a) == 50
    for i in (0, 7, 49):
        s = a[i]
        assert s.dtype == np.int64 and s.shape == (33,) and s.min() >= 0 and s.max() < 1000
        np.testing.assert_array_equal(s, b[i])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[3], MockGPTDataset(50, 32, 1000, seed=6)[3])
    with pytest.raises(IndexError):
        a[50]


def test_builtin_corpus_builds_once_and_is_reused(tmp_path):
    logs = []
    prefix = builtin_corpus_prefix(str(tmp_path), log=logs.append, max_bytes=300_000)
    assert "building" in logs[0]
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and 5 < ds.num_documents == len(ds)
    assert 100_000 < int(ds.sequence_lengths.sum()) <= 300_000 + len(ds)
    assert all(ds[i][-1] == 256 for i in range(len(ds)))
    from megalite.data.builtin_corpus import stdlib_files
    first_path = stdlib_files(300_000)[0][0]
    with open(first_path, "rb") as f:
        assert bytes(ds[0][:-1].astype(np.uint8)) == f.read()
    assert "site-packages" not in first_path
    logs.clear()
    mtime = os.path.getmtime(prefix + ".bin")
    assert builtin_corpus_prefix(str(tmp_path), log=logs.append, max_bytes=300_000) == prefix
    assert "reusing" in logs[0] and os.path.getmtime(prefix + ".bin") == mtime
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(prefix) + s for s in (".bin", ".idx")]


def test_default_data_path_uses_builtin_corpus(tmp_path):
    train, valid, test = build_train_valid_test_datasets(None, "98,2,0", 64, 1, (100, 10, 0),
                                                         str(tmp_path), log=lambda s: None)
    assert "stdlib" in train.dataset_path and len(train) >= 100 and len(valid) >= 10
    assert test is None
    text = bytes(train[0][train[0] < 256].astype(np.uint8)).decode("utf-8", errors="replace")
    assert len(text) > 10


def test_build_data_cache_tool_prebuilds_what_training_loads(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), 100)
    cache = str(tmp_path / "cache")
    r = run_tool("build_data_cache.py", "--data-path", prefix, "--split", "90,10,0",
                 "--seq-length", "8", "--train-iters", "20", "--global-batch-size", "4",
                 "--eval-interval", "10", "--eval-iters", "2", "--data-cache-path", cache,
                 "--tokenizer-type", "ByteTokenizer")  # the training flags (see test_pitfalls.py)
    assert r.returncode == 0, r.stderr
    assert "train 80, valid 24, test 8" in r.stdout
    logs = []
    build_train_valid_test_datasets([prefix], "90,10,0", 8, 1234,
                                    train_valid_test_num_samples(20, 4, 10, 2), cache,
                                    tokenizer_eod=256, log=logs.append)  # ByteTokenizer's eod
    assert len(logs) == 2 and all(s.startswith("> loaded") for s in logs)
