"""The GPU recipes of examples/gpus/ cannot rot: on the CPU, each recipe's commands (``bash
RECIPE.sh print``) parse at the recipe's world size, its layout is the fastest that fits by the
tools/plan.py search it names (run here in-process, on the same flags), the throughput its
header states is that plan's, and its one-GPU smoke run is the same model at 2 layers."""
import dataclasses
import os
import re
import shlex
import subprocess

import pytest
import torch

from megalite import planning
from megalite.config import parse_args
from megalite.training.device import choose_device
from tools import plan as plan_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = [("gpt2_124m", 1), ("gpt3_1.3b", 1), ("llama3_8b", 1), ("llama3_8b", 2), ("moe_8x1b", 1)]


def recipe_commands(name: str, nnodes: int) -> dict[str, list[str]]:
    """``{"train", "plan", "smoke"}``: the recipe's three commands, as argument lists."""
    out = subprocess.run(["bash", os.path.join(ROOT, "examples", "gpus", f"{name}.sh"), "print"], check=True,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "NNODES": str(nnodes)})
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    return dict(zip(("train", "plan", "smoke"), map(shlex.split, lines)))


def _launch(command: list[str]) -> tuple[int, int, list[str]]:
    """``(nnodes, nproc per node, pretrain_gpt.py flags)`` of a torchrun command."""
    assert command[0] == "torchrun" and "pretrain_gpt.py" in command, command
    script = command.index("pretrain_gpt.py")
    launcher = command[1:script]
    nnodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    return nnodes, int(launcher[launcher.index("--nproc_per_node") + 1]), command[script + 1:]


@pytest.mark.parametrize("name, nnodes", RECIPES)
def test_recipe_is_the_layout_its_plan_chose(name, nnodes):
    commands = recipe_commands(name, nnodes)
    got_nnodes, nproc, flags = _launch(commands["train"])
    world = got_nnodes * nproc
    assert got_nnodes == nnodes
    run = parse_args(flags, world_size=world)  # validation at the recipe's world size
    assert run.training.device == "cuda" and run.training.bf16
    assert [choose_device("cuda", r, nproc, nproc) for r in range(nproc)] == [torch.device("cuda", r)
                                                                             for r in range(nproc)]

    assert commands["plan"][:2] == ["python", "tools/plan.py"]
    cfg, hw, ns = plan_tool.parse(commands["plan"][2:])
    assert ns.search and cfg.world_size == world
    assert (cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.bf16) == \
        (run.training.micro_batch_size, run.training.global_batch_size, run.training.bf16)
    plans = planning.search(cfg, plan_tool.vocab_size_of(cfg), hw)
    ours = [pl for pl in plans if pl.cfg.model == run.model and pl.cfg.parallel == run.parallel]
    assert len(ours) == 1, f"{name}: the recipe's layout is not among the plan's layouts that fit"
    assert ours[0].times["total"] <= plans[0].times["total"] * 1.0001, (
        f"{name}: plan.py now ranks another layout faster: {plan_tool.layout_line(plans[0].cfg)}")

    header = open(os.path.join(ROOT, "examples", "gpus", f"{name}.sh")).read().split("\nNAME=")[0]
    tokens_per_second = cfg.training.global_batch_size * cfg.model.seq_length / ours[0].times["total"]
    stated = [float(x) * 1e3 for x in re.findall(r"([\d.]+)k tokens/s", header)]
    assert any(abs(x - tokens_per_second) <= 0.02 * tokens_per_second for x in stated), (
        f"{name}: the header's throughput {stated} is not the plan's {tokens_per_second:,.0f} tokens/s")

    smoke_nnodes, smoke_nproc, smoke_flags = _launch(commands["smoke"])
    smoke = parse_args(smoke_flags, world_size=1)
    assert (smoke_nnodes, smoke_nproc, smoke.model.num_layers) == (1, 1, 2)
    assert smoke.model == dataclasses.replace(run.model, num_layers=2)
