"""Flag parsing: Megatron names, derived defaults, and one clear message per bad combination."""
import os
import subprocess
import sys

import pytest

from megalite.config import parse_args


def _error(argv, world=1, capsys=None):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, world_size=world)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_defaults_and_derived_values():
    cfg = parse_args(["--tensor-model-parallel-size", "2"], world_size=4)
    assert cfg.data_parallel_size == 2
    assert cfg.training.global_batch_size == cfg.training.micro_batch_size * 2
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size
    assert cfg.model.num_query_groups == cfg.model.num_attention_heads
    assert cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.num_microbatches == 1


@pytest.mark.parametrize("argv,world,message", [
    (["--num-attention-heads", "6", "--hidden-size", "48", "--tensor-model-parallel-size", "4"], 4,
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], 2,
     "--global-batch-size 10 is not divisible by --micro-batch-size 4 x data-parallel size 2"),
    (["--hidden-size", "100", "--num-attention-heads", "8"], 1,
     "--hidden-size 100 is not divisible by --num-attention-heads 8"),
    (["--num-layers", "6", "--pipeline-model-parallel-size", "4"], 4,
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4"),
    (["--seq-length", "256", "--max-position-embeddings", "128"], 1,
     "--seq-length 256 exceeds --max-position-embeddings 128"),
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--sequence-parallel"], 1, "--sequence-parallel requires --tensor-model-parallel-size > 1"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are mutually exclusive"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--pipeline-schedule", "gpipe"], 2, "--pipeline-schedule gpipe does not support"),
    (["--data-path", "a_text_document"], 1, "--data-path needs --tokenizer-type"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "12", "--micro-batch-size", "4"], 2,
     "needs the number of micro-batches (3 = global batch / (micro batch x DP)) to be a multiple of "
     "--pipeline-model-parallel-size 2"),
])
def test_inconsistent_flags_fail_with_one_clear_message(argv, world, message, capsys):
    err = _error(argv, world, capsys)
    assert message in err
    assert len(err.strip().splitlines()) == 1  # one line, no usage dump


def test_unknown_flag_is_rejected(capsys):
    err = _error(["--num-layer", "4"], 1, capsys)  # no abbreviations: a typo is an error
    assert "unrecognized arguments: --num-layer 4" in err


def test_entry_point_reports_bad_flags_before_training():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--num-attention-heads", "3"], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert out.returncode == 2
    assert "--hidden-size 128 is not divisible by --num-attention-heads 3" in out.stderr
