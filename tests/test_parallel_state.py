"""rank_groups against hand-checked layouts, and ParallelState on real gloo groups."""
import subprocess
import sys

import pytest
import torch.distributed as dist

from distributed_helper import run_distributed
from megalite.parallel_state import ParallelState, coordinates, rank_groups, rank_of


def test_design_example_w8_tp2_pp2():
    g = rank_groups(8, tp=2, pp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert g["cp"] == [[r] for r in range(8)]
    assert g["dp_cp"] == g["dp"]
    assert g["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["position_embedding"] == [[0], [1], [2], [3]]


def test_w8_pp4():
    g = rank_groups(8, pp=4)
    assert g["pp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["dp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["tp"] == [[r] for r in range(8)]
    assert g["mp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["embedding"] == [[0, 6], [1, 7]]
    assert g["position_embedding"] == [[0], [1]]


def test_w16_tp2_pp2_cp2():
    g = rank_groups(16, tp=2, pp=2, cp=2)
    assert g["tp"] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert g["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert g["pp"] == [[i, i + 8] for i in range(8)]
    assert g["mp"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert g["embedding"] == [[i, i + 8] for i in range(8)]


def test_single_rank_embedding_group_when_no_pipeline():
    assert rank_groups(4, tp=2)["embedding"] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("world,tp,pp,cp", [(8, 2, 2, 1), (16, 2, 2, 2), (12, 3, 2, 1), (8, 1, 4, 2)])
def test_groups_partition_the_world_and_coordinates_invert(world, tp, pp, cp):
    g = rank_groups(world, tp=tp, pp=pp, cp=cp)
    for name in ("tp", "pp", "dp", "cp", "dp_cp", "mp"):
        assert sorted(r for grp in g[name] for r in grp) == list(range(world)), name
    dp = world // (tp * pp * cp)
    for rank in range(world):
        c = coordinates(rank, world, tp=tp, pp=pp, cp=cp)
        assert rank_of(c["tp"], c["cp"], c["dp"], c["pp"], tp, cp, dp) == rank


@pytest.mark.parametrize("args,needle", [((8, 3, 1, 1), "world size 8 is not divisible"),
                                         ((6, 2, 2, 1), "(= 4)"), ((8, 0, 1, 1), "tp must be")])
def test_invalid_sizes_raise_naming_the_numbers(args, needle):
    with pytest.raises(ValueError) as e:
        rank_groups(*args[:1], tp=args[1], pp=args[2], cp=args[3])
    assert needle in str(e.value)


def test_cli_print_matches_design():
    out = subprocess.run([sys.executable, "-c", "from megalite.parallel_state import rank_groups; "
                          "print(rank_groups(8,tp=2,pp=2))"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert "'dp': [[0, 2], [1, 3], [4, 6], [5, 7]]" in out


def _check_state(rank, world):
    ps = ParallelState.from_sizes(tp=2, pp=2, vpp=2)
    expected = rank_groups(world, tp=2, pp=2)
    for name in ("tp", "pp", "dp", "mp", "embedding"):
        mine = [g for g in expected[name] if rank in g][0]
        assert ps.group_ranks[name] == mine, name
        assert dist.get_world_size(ps.groups[name]) == len(mine)
    # position_embedding: ranks kept (the contract's layout), but no process group is created.
    assert ps.group_ranks["position_embedding"] == ([rank] if rank < 4 else [])
    assert "position_embedding" not in ps.groups
    assert ps.is_pipeline_first_stage() == (rank < 4)
    assert ps.is_pipeline_last_stage() == (rank >= 4)
    assert not ps.is_pipeline_last_stage(vp_rank=0)
    assert ps.is_pipeline_first_stage(vp_rank=0) == (rank < 4)
    assert not ps.is_pipeline_first_stage(vp_rank=1)
    return (ps.tp_rank, ps.pp_rank, ps.dp_rank, ps.next_pp_rank, ps.prev_pp_rank)


def test_parallel_state_on_gloo():
    out = run_distributed(_check_state, 8)
    assert out[0] == (0, 0, 0, 4, 4)
    assert out[3] == (1, 0, 1, 7, 7)
    assert out[6] == (0, 1, 1, 2, 2)
