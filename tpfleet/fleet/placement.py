"""One placement plan, computed in one place: which physical GPU each rank of each engine uses.

Everything downstream takes its GPU facts from the plan. An engine process is started with
CUDA_VISIBLE_DEVICES set to its GPUs' UUIDs in rank order, so rank r opens local index r, whatever
the launcher's own CUDA_VISIBLE_DEVICES or Ray's masking was; and rank r checks at start that the
device it opened has the UUID the plan says. A physical id is never passed where a local index is
expected: the plan records both, and only the engine's own environment turns one into the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tpfleet.devices import DeviceError, PhysicalGPU


@dataclass(frozen=True)
class RankPlacement:
    engine: int
    rank: int
    gpu_uuid: str
    physical_index: int  # the driver's index on its host (nvidia-smi), for people, never for CUDA calls
    local_index: int  # the CUDA index of this GPU inside the engine's process
    host: str


@dataclass(frozen=True)
class EnginePlacement:
    engine: int
    host: str
    ranks: tuple[RankPlacement, ...]
    node_id: str = ""  # the Ray node it runs on (hosts can repeat: several Ray nodes on one machine)

    @property
    def uuids(self) -> list[str]:
        return [r.gpu_uuid for r in self.ranks]

    @property
    def cuda_visible_devices(self) -> str:
        """What the engine process gets: UUIDs, so no remapping can change what an index means."""
        return ",".join(self.uuids)

    def describe(self) -> str:
        return ",".join(f"{r.physical_index}" for r in self.ranks) if self.ranks else "cpu"


@dataclass(frozen=True)
class PlacementPlan:
    engines: tuple[EnginePlacement, ...]

    def to_dict(self) -> dict:
        return {"engines": [asdict(e) for e in self.engines]}

    def table(self) -> str:
        rows = ["engine  rank  host          physical  local  uuid"]
        for e in self.engines:
            for r in e.ranks:
                rows.append(f"{r.engine:>6}  {r.rank:>4}  {r.host:<12}  {r.physical_index:>8}  {r.local_index:>5}  "
                            f"{r.gpu_uuid}")
        return "\n".join(rows)


def select_gpus(requested: list[str] | None, visible: list[PhysicalGPU]) -> list[PhysicalGPU]:
    """The GPUs a fleet may use. `requested` entries are indices into the launcher's visible list
    (what a user means by --gpus 0,1 under their own CUDA_VISIBLE_DEVICES) or UUIDs (prefixes too)."""
    if not requested:
        return list(visible)
    chosen = []
    for entry in requested:
        entry = entry.strip()
        if entry.isdigit():
            i = int(entry)
            if i >= len(visible):
                raise DeviceError(f"--gpus entry {i} is out of range: this process sees {len(visible)} GPUs "
                                  f"({[g.uuid for g in visible]})")
            gpu = visible[i]
        else:
            matches = [g for g in visible if g.uuid.startswith(entry)]
            if len(matches) != 1:
                raise DeviceError(f"--gpus entry {entry!r} matches {len(matches)} visible GPUs")
            gpu = matches[0]
        if gpu in chosen:
            raise DeviceError(f"--gpus names {gpu.uuid} twice")
        chosen.append(gpu)
    return chosen


def plan_placement(gpus: list[PhysicalGPU], num_engines: int, tp_size: int, host: str = "localhost") -> PlacementPlan:
    """Engines take consecutive groups of `tp_size` GPUs, in the order given."""
    need = num_engines * tp_size
    if need > len(gpus):
        raise DeviceError(f"{num_engines} engines x TP {tp_size} need {need} GPUs; only {len(gpus)} are available "
                          f"({[g.uuid for g in gpus]})")
    engines = []
    for engine in range(num_engines):
        group = gpus[engine * tp_size:(engine + 1) * tp_size]
        ranks = tuple(RankPlacement(engine, rank, g.uuid, g.index, rank, host) for rank, g in enumerate(group))
        engines.append(EnginePlacement(engine, host, ranks))
    return PlacementPlan(tuple(engines))


@dataclass(frozen=True)
class BundleFacts:
    """What a process placed on one engine's resources measured there (a Ray actor in its bundle)."""
    host: str
    ip: str
    gpu_ids: tuple[str, ...]  # the GPUs granted to it (Ray: physical indices, or UUIDs)
    uuids: tuple[str, ...]  # the same GPUs' UUIDs, from NVML on that host ("logical-N" where there is none)
    cuda_visible_devices: str | None  # what its environment said: masked per actor, or not at all
    node_id: str = ""  # the Ray node


def merge_rank_facts(engine: int, ranks: list[BundleFacts], with_gpus: bool) -> BundleFacts:
    """One engine's facts from its ranks' bundles (one actor per rank): they must share a node, and
    with GPUs each rank holds exactly one, so rank r's GPU is the one rank r's bundle holds."""
    nodes = sorted({r.node_id for r in ranks})
    if len(nodes) > 1:
        raise DeviceError(f"engine {engine}'s ranks were placed on nodes {nodes}: the ranks of one engine must "
                          "share a node; pick bundle_indices on one node")
    if with_gpus:
        for rank, facts in enumerate(ranks):
            if len(facts.uuids) != 1:
                raise DeviceError(f"engine {engine} rank {rank} on {facts.host} was granted GPUs "
                                  f"{list(facts.gpu_ids)}; each rank's bundle must give it exactly one")
    first = ranks[0]
    return BundleFacts(first.host, first.ip, tuple(i for r in ranks for i in r.gpu_ids),
                       tuple(u for r in ranks for u in r.uuids), first.cuda_visible_devices, first.node_id)


def plan_from_bundles(bundles: list[BundleFacts], tp_size: int, with_gpus: bool,
                      use_node_ip: bool = False) -> PlacementPlan:
    """Engine e runs where bundle e is, on the GPUs measured there, in the order reported. Without
    GPUs (CPU engines) the plan has no ranks. `use_node_ip`: engines are addressed by node IP."""
    engines = []
    seen: dict[str, int] = {}
    for engine, bundle in enumerate(bundles):
        host = bundle.ip if use_node_ip else bundle.host
        if not with_gpus:
            engines.append(EnginePlacement(engine, host, (), bundle.node_id))
            continue
        if len(bundle.uuids) != tp_size or len(bundle.gpu_ids) != tp_size:
            raise DeviceError(f"engine {engine} on {bundle.host} was granted GPUs {list(bundle.gpu_ids)} "
                              f"({list(bundle.uuids)}); TP {tp_size} needs {tp_size}")
        for gpu_uuid in bundle.uuids:
            if gpu_uuid in seen:
                raise DeviceError(f"GPU {gpu_uuid} was granted to engines {seen[gpu_uuid]} and {engine}")
            seen[gpu_uuid] = engine
        ranks = tuple(RankPlacement(engine, rank, gpu_uuid, int(gpu_id) if gpu_id.isdigit() else -1, rank, host)
                      for rank, (gpu_id, gpu_uuid) in enumerate(zip(bundle.gpu_ids, bundle.uuids)))
        engines.append(EnginePlacement(engine, host, ranks, bundle.node_id))
    return PlacementPlan(tuple(engines))


def cpu_plan(num_engines: int, host: str = "localhost") -> PlacementPlan:
    """CPU engines: nothing to place, but the same shape of plan for the same code paths."""
    return PlacementPlan(tuple(EnginePlacement(e, host, ()) for e in range(num_engines)))
