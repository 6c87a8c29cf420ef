"""Process-group layout for tensor / context / data / pipeline parallelism.

Two pieces, kept apart on purpose:

* :func:`rank_groups` is a *pure* function: it maps a world size and the parallel sizes to
  lists of ranks, using Megatron-Core's default order ``tp-cp-ep-dp-pp`` (tensor parallel
  varies fastest, pipeline slowest)::

      rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank))

  It can be unit-tested and printed without any processes.

* :class:`ParallelState` turns that layout into ``torch.distributed`` process groups and
  exposes this rank's coordinates. It is passed explicitly to layers, schedules and
  optimizers; there is no module-level global state.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Groups that get a torch process group. rank_groups() also returns "position_embedding"
# (Megatron's layout, kept in ``group_ranks``), but nothing communicates over it: learned
# position embeddings live on the first stage only, so their grads need no reduction across
# stages. Creating an unused group would cost every rank a collective new_group call.
PROCESS_GROUPS = ("tp", "pp", "dp", "cp", "dp_cp", "mp", "embedding")
EXPERT_GROUPS = ("ep", "etp", "tp_ep", "tp_ep_pp", "edp")  # created only for MoE models


def _check_sizes(world_size: int, tp: int, pp: int, cp: int) -> int:
    """Return the data-parallel size, or raise ValueError naming the sizes at fault."""
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-parallel size {tp} x "
            f"pipeline-parallel size {pp} x context-parallel size {cp} (= {model_parallel})")
    return world_size // model_parallel


def rank_of(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int,
            tp: int, cp: int, dp: int) -> int:
    """Global rank of the given coordinates in Megatron's ``tp-cp-ep-dp-pp`` order."""
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def _grid_groups(sizes: dict[str, int], order: tuple[str, ...], varying: tuple[str, ...]) -> list[list[int]]:
    """All rank lists of a grid whose dims run ``order`` (fastest first), obtained by fixing
    every coordinate except those in ``varying``."""
    strides, stride = {}, 1
    for d in order:
        strides[d], stride = stride, stride * sizes[d]
    fixed = [d for d in order if d not in varying]
    groups = []
    for fixed_coords in itertools.product(*(range(sizes[d]) for d in fixed)):
        base = sum(c * strides[d] for d, c in zip(fixed, fixed_coords))
        groups.append(sorted(base + sum(c * strides[d] for d, c in zip(varying, var_coords))
                             for var_coords in itertools.product(*(range(sizes[d]) for d in varying))))
    return sorted(groups)


DENSE_ORDER = ("tp", "cp", "dp", "pp")   # Megatron-Core's tp-cp-ep-dp-pp with ep = 1
EXPERT_ORDER = ("tp", "ep", "dp", "pp")  # its expert grid: tp-cp-ep-dp-pp with cp = 1 (tp = ETP, dp = EDP)


def _groups_varying(sizes: dict[str, int], varying: tuple[str, ...]) -> list[list[int]]:
    """Rank lists of the dense grid varying the ``varying`` dims."""
    return _grid_groups(sizes, DENSE_ORDER, varying)


def expert_data_parallel_size(world_size: int, pp: int, ep: int, etp: int) -> int:
    """EDP = W / (ETP x EP x PP), or ValueError naming the sizes at fault."""
    for name, value in (("ep", ep), ("etp", etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (etp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by expert-tensor-parallel size {etp} x "
                         f"expert-model-parallel size {ep} x pipeline-parallel size {pp} (= {etp * ep * pp})")
    return world_size // (etp * ep * pp)


def rank_groups(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
                etp: int | None = None) -> dict[str, list[list[int]]]:
    """Rank lists of every parallel group, identical to Megatron-Core's for the same layout.

    Returns a dict with keys ``tp pp dp cp dp_cp mp embedding position_embedding``, each a
    sorted list of sorted rank lists. ``dp`` excludes context parallelism, ``dp_cp`` includes
    it; ``mp`` is tp x pp for one (dp, cp) index; ``embedding`` holds the first and last stage
    of each pipeline (the single rank when pp == 1); ``position_embedding`` the first stage.
    With expert parallelism (``ep`` > 1 or ``etp`` given) also ``ep etp tp_ep tp_ep_pp edp``:
    Megatron-Core's second ("parallel folding") grid of ETP x EP x EDP x PP ranks (EDP = W /
    (ETP EP PP)), whose pipeline groups are the dense ones.

    >>> rank_groups(8, tp=2, pp=2)["dp"]
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    """
    dp = _check_sizes(world_size, tp, pp, cp)
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    pp_groups = _groups_varying(sizes, ("pp",))
    groups = {
        "tp": _groups_varying(sizes, ("tp",)),
        "pp": pp_groups,
        "dp": _groups_varying(sizes, ("dp",)),
        "cp": _groups_varying(sizes, ("cp",)),
        "dp_cp": _groups_varying(sizes, ("cp", "dp")),
        "mp": _groups_varying(sizes, ("tp", "pp")),
        "embedding": sorted(sorted({g[0], g[-1]}) for g in pp_groups),
        "position_embedding": sorted([g[0]] for g in pp_groups),
    }
    if ep > 1 or etp is not None:
        etp = tp if etp is None else etp
        expert = {"tp": etp, "ep": ep, "dp": expert_data_parallel_size(world_size, pp, ep, etp), "pp": pp}
        for name, varying in (("ep", ("ep",)), ("etp", ("tp",)), ("tp_ep", ("tp", "ep")),
                              ("tp_ep_pp", ("tp", "ep", "pp")), ("edp", ("dp",))):
            groups[name] = _grid_groups(expert, EXPERT_ORDER, varying)
    return groups


def coordinates(rank: int, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> dict[str, int]:
    """The (tp, cp, dp, pp) coordinates of ``rank``; the inverse of :func:`rank_of`."""
    dp = _check_sizes(world_size, tp, pp, cp)
    return {"tp": rank % tp, "cp": (rank // tp) % cp, "dp": (rank // (tp * cp)) % dp,
            "pp": rank // (tp * cp * dp)}


def expert_coordinates(rank: int, world_size: int, pp: int = 1, ep: int = 1, etp: int = 1) -> dict[str, int]:
    """The (etp, ep, edp, pp) coordinates of ``rank`` in the expert grid."""
    edp = expert_data_parallel_size(world_size, pp, ep, etp)
    return {"etp": rank % etp, "ep": (rank // etp) % ep, "edp": (rank // (etp * ep)) % edp,
            "pp": rank // (etp * ep * edp)}


@dataclass
class ParallelState:
    """This rank's view of the parallel layout: sizes, ranks and torch process groups.

    Build it with :meth:`from_sizes` after ``torch.distributed.init_process_group`` (or without
    it for a single process, where every group is ``None`` and collectives are skipped).
    Groups are exposed as ``tp_group``, ``pp_group``, ``dp_group``, ``cp_group``,
    ``dp_cp_group``, ``mp_group`` and ``embedding_group``; ``group_ranks[name]`` holds the
    global ranks of this rank's group for every name :func:`rank_groups` returns.
    """

    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    vpp_size: int | None = None
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    ep_size: int = 1       # the expert grid (MoE): EP x ETP x EDP x PP
    etp_size: int = 1
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    groups: dict = field(default_factory=dict)       # name -> ProcessGroup | None
    group_ranks: dict = field(default_factory=dict)  # name -> list of global ranks

    @classmethod
    def from_sizes(cls, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                   backend: str | None = None, ep: int | None = None, etp: int | None = None) -> "ParallelState":
        """Create every process group of the layout (collective: all ranks must call it).

        ``ep`` (expert-model-parallel size) set, also the expert grid's groups (``ep``,
        ``etp``, ``tp_ep``, ``tp_ep_pp``, ``edp``; ``etp`` defaults to ``tp``)."""
        initialized = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        experts = ep is not None
        etp = (etp or tp) if experts else None
        layout = rank_groups(world_size, tp=tp, pp=pp, cp=cp, ep=ep or 1, etp=etp)
        coords = coordinates(rank, world_size, tp=tp, pp=pp, cp=cp)
        if vpp is not None and vpp > 1 and pp < 2:
            raise ValueError(f"virtual pipeline size {vpp} needs pipeline-parallel size > 1, got {pp}")
        state = cls(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp, cp_size=cp,
                    dp_size=world_size // (tp * pp * cp), vpp_size=vpp,
                    tp_rank=coords["tp"], pp_rank=coords["pp"], cp_rank=coords["cp"],
                    dp_rank=coords["dp"])
        if experts:
            e = expert_coordinates(rank, world_size, pp=pp, ep=ep, etp=etp)
            state.ep_size, state.etp_size, state.ep_rank, state.etp_rank, state.edp_rank = \
                ep, etp, e["ep"], e["etp"], e["edp"]
        for name, name_groups in layout.items():
            state.group_ranks[name] = next((ranks for ranks in name_groups if rank in ranks), [])
        for name in PROCESS_GROUPS + (EXPERT_GROUPS if experts else ()):
            state.groups[name] = None
            for ranks in layout[name]:
                # new_group is collective over the whole world: every rank creates every group.
                group = dist.new_group(ranks, backend=backend) if initialized and world_size > 1 else None
                if rank in ranks:
                    state.groups[name] = group
        return state

    @classmethod
    def from_config(cls, cfg, backend: str | None = None) -> "ParallelState":
        """The layout of a parsed :class:`megalite.config.Config` (collective, as :meth:`from_sizes`)."""
        p = cfg.parallel
        return cls.from_sizes(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                              cp=p.context_parallel_size, vpp=cfg.virtual_pipeline_size, backend=backend,
                              ep=p.expert_model_parallel_size if cfg.model.num_experts else None,
                              etp=p.expert_tensor_parallel_size)

    # -- groups ---------------------------------------------------------------------------
    tp_group = property(lambda self: self.groups.get("tp"))
    pp_group = property(lambda self: self.groups.get("pp"))
    dp_group = property(lambda self: self.groups.get("dp"))
    cp_group = property(lambda self: self.groups.get("cp"))
    dp_cp_group = property(lambda self: self.groups.get("dp_cp"))
    mp_group = property(lambda self: self.groups.get("mp"))
    embedding_group = property(lambda self: self.groups.get("embedding"))
    ep_group = property(lambda self: self.groups.get("ep"))
    etp_group = property(lambda self: self.groups.get("etp"))
    tp_ep_group = property(lambda self: self.groups.get("tp_ep"))
    tp_ep_pp_group = property(lambda self: self.groups.get("tp_ep_pp"))
    edp_group = property(lambda self: self.groups.get("edp"))

    @property
    def edp_size(self) -> int:
        """Size of the expert-data-parallel group (the replicas of one expert shard)."""
        return self.world_size // (self.etp_size * self.ep_size * self.pp_size)

    @property
    def dp_cp_size(self) -> int:
        """Size of the data-parallel group including context parallelism."""
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in its ``dp_cp`` group (cp varies fastest, as in the rank order)."""
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, first stage first."""
        return self.group_ranks.get("pp") or [self.rank]

    @property
    def next_pp_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps round: virtual stages go in a ring)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_pp_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps round, as :attr:`next_pp_rank`)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def in_embedding_group(self) -> bool:
        """Whether this rank holds a copy of the (tied) word embeddings to keep in sync."""
        return self.rank in self.group_ranks.get("embedding", [self.rank])

    # -- pipeline stages --------------------------------------------------------------
    def is_pipeline_first_stage(self, vp_rank: int | None = None) -> bool:
        """True on the first stage; with virtual stages, only for model chunk 0 there."""
        if vp_rank is not None and vp_rank != 0:
            return False
        return self.pp_rank == 0

    def is_pipeline_last_stage(self, vp_rank: int | None = None) -> bool:
        """True on the last stage; with virtual stages, only for the last model chunk there."""
        if vp_rank is not None and self.vpp_size and vp_rank != self.vpp_size - 1:
            return False
        return self.pp_rank == self.pp_size - 1


def single_process_state() -> ParallelState:
    """A ParallelState for one process without torch.distributed (all sizes 1)."""
    return ParallelState.from_sizes()


def default_backend() -> str:
    """nccl when CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


if __name__ == "__main__":  # pragma: no cover - convenience for users
    import json
    import sys

    args = [int(a) for a in sys.argv[1:]] or [8, 2, 2]
    print(json.dumps(rank_groups(*args), indent=1))
