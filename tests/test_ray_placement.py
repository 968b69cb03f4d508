"""Engines placed by Ray: in placement groups of their own, or in the bundles of a trainer's group, on a
two-node cluster with logical GPUs, with and without RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from tpfleet.devices import DeviceError
from tpfleet.fleet import Fleet, FleetConfig
from tpfleet.fleet.placement import BundleFacts, merge_rank_facts, plan_from_bundles

ray = pytest.importorskip("ray")
TWO_TOKENS = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


def test_one_gpu_per_rank_bundle_in_rank_order_feeds_the_engines_uuid_check():
    uuids = [f"GPU-{i}0000000-1111-2222-3333-444444444444" for i in range(3)]
    ranks = [BundleFacts("host-a", "10.0.0.1", ("2",), (uuids[2],), "2", "node-a"),
             BundleFacts("host-a", "10.0.0.1", ("0",), (uuids[0],), "0", "node-a")]
    merged = merge_rank_facts(0, ranks, with_gpus=True)
    plan = plan_from_bundles([merged], 2, with_gpus=True)
    assert plan.engines[0].uuids == [uuids[2], uuids[0]] and plan.engines[0].node_id == "node-a"
    assert plan.engines[0].cuda_visible_devices == f"{uuids[2]},{uuids[0]}"  # rank r opens local index r
    cfg = FleetConfig(model="m", tp_size=2, backend="ray", placement_group="pg", bundle_indices=[5, 4])
    assert cfg.engine_config(plan.engines[0].uuids).gpu_uuids == [uuids[2], uuids[0]]  # what each rank checks
    with pytest.raises(DeviceError, match="exactly one"):
        merge_rank_facts(0, [ranks[0], BundleFacts("host-a", "10.0.0.1", ("0", "1"), tuple(uuids[:2]), None,
                                                   "node-a")], with_gpus=True)
    with pytest.raises(DeviceError, match="must share a node"):
        merge_rank_facts(0, [ranks[0], BundleFacts("host-b", "10.0.0.2", ("1",), (uuids[1],), None, "node-b")],
                         with_gpus=True)


@pytest.fixture(scope="module", params=[False, True], ids=["ray-sets-cvd", "noset"])
def cluster(request):
    """Two Ray nodes of 4 logical GPUs each (node_a is the head), shared by the module's tests; the
    NOSET variable must be set before Ray starts its workers."""
    from ray.cluster_utils import Cluster

    names = ("CUDA_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
    saved = {name: os.environ.pop(name, None) for name in names}
    if request.param:
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 4, "resources": {"node_a": 8}})
    cluster.add_node(num_cpus=2, num_gpus=4, resources={"node_b": 8})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield request.param
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@pytest.fixture
def trainer_group(cluster):
    """A trainer's placement group: bundles 0, 1 on node_a and 2, 3 on node_b, one GPU each, with a
    trainer actor holding 0.8 of each bundle's GPU (an EngineActor: it reports the GPU and node Ray gave it,
    and Ray's workers can import it)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tpfleet.fleet.ray_backend import EngineActor

    group = placement_group([{"GPU": 1, "node_a": 1}] * 2 + [{"GPU": 1, "node_b": 1}] * 2, name="trainer")
    ray.get(group.ready(), timeout=60)
    trainers = [ray.remote(EngineActor).options(num_cpus=0, num_gpus=0.8, scheduling_strategy=(
        PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i))).remote()
        for i in range(4)]
    where = [(list(f.gpu_ids), f.node_id) for f in ray.get([t.describe.remote() for t in trainers])]
    assert where[0] != where[1] and where[2] != where[3]  # bundles on one node hold different GPUs
    yield group, where
    for t in trainers:
        ray.kill(t)
    remove_placement_group(group)


def _cfg(tiny_model, tmp_path, **kw) -> FleetConfig:
    return FleetConfig(model=str(tiny_model), log_dir=str(tmp_path), backend="ray", ray_logical_gpus=True,
                       engine={"kv_cache_tokens": 4096}, **kw)


def _check_trainer_placement(backend, plan, bundles: list[int], where, nodes, noset: bool) -> None:
    for engine, bundle in enumerate(bundles):
        facts = backend.rank_facts[engine]
        assert [list(facts.gpu_ids), facts.node_id] == list(where[bundle])  # the GPU its bundle holds
        assert facts.node_id == nodes[bundle] and plan.engines[engine].node_id == nodes[bundle]
        if noset:
            assert facts.cuda_visible_devices in (None, "")  # Ray left it alone
        else:
            assert facts.cuda_visible_devices == ",".join(facts.gpu_ids)


def test_engines_run_on_the_trainers_bundles_across_nodes(tiny_model, tmp_path, cluster, trainer_group):
    from tpfleet.fleet.ray_backend import RayBackend

    group, where = trainer_group
    nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
    assert nodes[0] != nodes[3]  # two nodes
    cfg = _cfg(tiny_model, tmp_path, engines=2, placement_group="trainer", bundle_indices=[3, 0],
               num_gpus_per_actor=0.2, max_concurrent_starts=2)
    if cluster:  # CPU engines ignore CUDA_VISIBLE_DEVICES: under NOSET only the placement can differ
        backend = RayBackend(cfg, tmp_path, lambda *a: None)
        try:
            _check_trainer_placement(backend, backend.plan(), [3, 0], where, nodes, noset=True)
        finally:
            backend.close()
        return
    with Fleet(cfg) as fleet:
        _check_trainer_placement(fleet.backend, fleet.plan, [3, 0], where, nodes, noset=False)
        assert len(fleet.urls) == 2
        for url in fleet.urls:
            assert httpx.post(f"{url}/generate", json=TWO_TOKENS, timeout=60).status_code == 200
        assert sorted(w.url for w in fleet.workers.healthy()) == sorted(fleet.urls)  # a router's registry
    assert fleet.workers.all() == []


def test_tp_ranks_take_their_own_bundles_and_must_share_a_node(tiny_model, tmp_path, cluster, trainer_group):
    from tpfleet.fleet.ray_backend import RayBackend

    group, where = trainer_group
    backend = RayBackend(_cfg(tiny_model, tmp_path, tp_size=2, placement_group=group, bundle_indices=[1, 0],
                              num_gpus_per_actor=0.2), tmp_path, lambda *a: None)
    try:
        backend.plan()
        assert [list(f.gpu_ids) for f in backend.rank_facts] == [where[1][0], where[0][0]]  # rank r: bundle r's GPU
        assert list(backend.facts[0].gpu_ids) == where[1][0] + where[0][0]
        assert len(backend.actors) == 1 and len(backend.rank_actors) == 2
    finally:
        backend.close()
    across = RayBackend(_cfg(tiny_model, tmp_path, tp_size=2, placement_group=group.id.hex(), bundle_indices=[0, 2],
                             num_gpus_per_actor=0.2), tmp_path, lambda *a: None)
    try:
        with pytest.raises(DeviceError, match="must share a node"):
            across.plan()
    finally:
        across.close()
    with pytest.raises(ValueError, match="bundle_indices"):
        FleetConfig(model="m", backend="ray", engines=2, placement_group=group, bundle_indices=[0])
    with pytest.raises(ValueError, match="needs backend='ray'"):
        FleetConfig(model="m", placement_group=group, bundle_indices=[0])
    with pytest.raises(ValueError, match="no placement group"):
        RayBackend(_cfg(tiny_model, tmp_path, placement_group="nobody", bundle_indices=[0]), tmp_path,
                   lambda *a: None).plan()


def test_own_placement_groups_give_each_engine_distinct_gpus(tiny_model, tmp_path, cluster):
    from tpfleet.fleet.ray_backend import RayBackend

    backend = RayBackend(_cfg(tiny_model, tmp_path, engines=2, tp_size=2), tmp_path, lambda *a: None)
    try:
        plan = backend.plan()
        ids = [(f.node_id, i) for f in backend.facts for i in f.gpu_ids]
        assert len(set(ids)) == 4 and all(len(f.gpu_ids) == 2 for f in backend.facts)
        assert [e.node_id for e in plan.engines] == [f.node_id for f in backend.facts]
        assert all(f.host == socket.gethostname() for f in backend.facts)
        for f in backend.facts:
            assert f.cuda_visible_devices in ((None, "") if cluster else (",".join(f.gpu_ids),))
    finally:
        backend.close()
