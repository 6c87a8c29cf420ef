"""Parity of the data pipeline with the real Megatron-Core (a test dependency: setup.py's ``test``
extra installs megatron-core, whose wheel ships the compiled ``helpers_cpp`` the index builders use).

Checks that IndexedDatasetBuilder writes the same bytes as Megatron-Core's, that each reader
reads the other's files, and that the train/valid/test datasets (document, sample, shuffle
and blending indices, and the sample tokens) are identical for single, sentence-level,
multi-epoch, weighted and unweighted blends. A missing megatron-core fails the test (run
``pip install -e '.[test]'``); it is never skipped.

The comparison runs in a child process because Megatron's BlendedDataset needs an initialised
torch.distributed group, which must not leak into the other tests.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# megatron-core's import notes that the optional CUDA kernels (apex, Transformer Engine) are absent.
pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")


def test_matches_megatron_core():
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401  (the compiled part the child needs)
        missing = None
    except ImportError as e:
        missing = e
    if missing is not None:
        pytest.fail(f"megatron-core is not importable ({missing}); it is a test dependency of megalite: "
                    "pip install -e '.[test]'", pytrace=False)
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("identical:") == 9 and "ALL OK" in r.stdout


class _Tokenizer:  # the few attributes Megatron's GPTDatasetConfig reads
    unique_identifiers = {"class": "ParityTokenizer"}
    eod = 0
    vocab_size = 60001

    @property
    def pad(self):
        raise AttributeError("no pad")


def _main():
    import torch
    import torch.distributed as dist
    from megatron.core.datasets.blended_dataset import BlendedDataset as MBlended
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MGPT, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import (IndexedDataset as MIndexed,
                                                        IndexedDatasetBuilder as MBuilder)

    from megalite.data import IndexedDataset, IndexedDatasetBuilder, build_train_valid_test_datasets

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0,
                            world_size=1)
    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(0)

    def make(name, n, dtype=np.uint16, sentences=False, empty_docs=False):
        mine = IndexedDatasetBuilder(f"{tmp}/{name}.bin", dtype=dtype)
        theirs = MBuilder(f"{tmp}/{name}_m.bin", dtype=dtype)
        for _ in range(n):
            for _ in range(rng.integers(1, 4) if sentences else 1):
                seq = rng.integers(0, 60000, rng.integers(0 if empty_docs else 1, 200))
                mine.add_item(seq)
                theirs.add_item(torch.from_numpy(seq.astype(np.int64)))
            mine.end_document()
            theirs.end_document()
        mine.finalize(f"{tmp}/{name}.idx")
        theirs.finalize(f"{tmp}/{name}_m.idx")
        for suffix in (".bin", ".idx"):
            with open(f"{tmp}/{name}{suffix}", "rb") as f, open(f"{tmp}/{name}_m{suffix}", "rb") as g:
                assert f.read() == g.read(), (name, suffix)
        ours, megatron = IndexedDataset(f"{tmp}/{name}_m"), MIndexed(f"{tmp}/{name}")
        assert all(np.array_equal(ours[i], megatron[i]) for i in range(len(ours)))
        return f"{tmp}/{name}"

    a, b = make("a", 500), make("b", 300, sentences=True)
    c, w = make("c", 800, empty_docs=True), make("w", 50, dtype=np.int32)
    print("builder bytes identical")

    def megatron_sample(ds, i):
        if isinstance(ds, MBlended):
            return megatron_sample(ds.datasets[ds.dataset_index[i]], ds.dataset_sample_index[i])
        return ds._query_document_sample_shuffle_indices(i)[0]

    def compare(data_path, blend, split, seq, seed, sizes):
        ours = build_train_valid_test_datasets(data_path, split, seq, seed, sizes,
                                               tempfile.mkdtemp(), log=lambda s: None)
        config = GPTDatasetConfig(random_seed=seed, sequence_length=seq, blend=blend,
                                  split=split, path_to_cache=tempfile.mkdtemp(),
                                  tokenizer=_Tokenizer(), reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False)
        theirs = BlendedMegatronDatasetBuilder(MGPT, list(sizes), lambda: True, config).build()
        for o, t in zip(ours, theirs):
            if o is None or t is None:
                assert (o is None) == (t is None or len(t) == 0)
                continue
            assert len(o) == len(t)
            pairs = [(o, t)]
            if isinstance(t, MBlended):
                assert np.array_equal(o.dataset_index, t.dataset_index)
                assert np.array_equal(o.dataset_sample_index, t.dataset_sample_index)
                pairs = list(zip(o.datasets, t.datasets))
            for od, td in pairs:
                for name in ("document_index", "sample_index", "shuffle_index"):
                    x, y = getattr(od, name), getattr(td, name)
                    assert x.dtype == y.dtype and np.array_equal(x, y), name
            for i in [*range(min(len(o), 300)), *range(max(0, len(o) - 50), len(o))]:
                assert np.array_equal(o[i], megatron_sample(t, i)), i
        print("identical:", split, seq, seed, sizes)

    compare([a], ([a], None), "96,3,1", 64, 1234, (2000, 100, 20))
    compare([c], ([c], None), "969,30,1", 64, 1234, (2000, 100, 20))   # empty documents
    compare([a], ([a], None), "90,10,0", 128, 7, (50, 3, 0))           # under one epoch
    compare([c], ([c], None), "80,20,0", 32, 3, (20000, 500, 0))       # many epochs
    compare([b], ([b], None), "1,1,1", 16, 5, (3000, 3000, 3000))      # sentence level
    compare(["0.3", a, "0.5", b, "0.2", c], ([a, b, c], [0.3, 0.5, 0.2]), "96,3,1", 64, 1234,
            (5000, 300, 40))
    compare(["3", a, "1", c], ([a, c], [3.0, 1.0]), "99,1,0", 32, 99, (10000, 200, 0))
    compare(["1", w], ([w], [1.0]), "100,0,0", 32, 1, (200, 0, 0))     # int32 tokens
    compare([a, c], ([a, c], None), "90,10,0", 64, 1, (100, 10, 0))    # blend by size
    dist.destroy_process_group()
    print("ALL OK")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, ROOT)
    _main()
