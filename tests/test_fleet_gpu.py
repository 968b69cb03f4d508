"""The fleet on real GPUs: remapped devices, Ray, stale processes, colocation, memory back to baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import NUM_GPUS

from tpfleet.fleet import Fleet, FleetConfig, StaleGPUProcesses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")]
ENGINE = {"mem_fraction_static": 0.3}


def check_fleet(fleet: Fleet) -> None:
    for url in fleet.urls:
        r = httpx.post(f"{url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}}, timeout=60)
        assert r.status_code == 200


def check_teardown(reports) -> None:
    from tpfleet.fleet.gpu_state import memory_info

    for r in reports:
        assert r.leftover == []
        totals = memory_info(list(r.gpu_memory))
        for uuid, (baseline, after) in r.gpu_memory.items():
            assert after <= baseline + 0.01 * totals[uuid][1], (uuid, baseline, after)


def test_remapped_visible_devices_place_engines_on_the_named_gpus(tiny_model, tmp_path, monkeypatch):
    from tpfleet.devices import physical_gpus

    phys = physical_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    fleet = Fleet(FleetConfig(model=str(tiny_model), engines=2, tp_size=1, device="cuda", engine=ENGINE,
                              log_dir=str(tmp_path), max_concurrent_starts=2))
    fleet.start()
    try:
        assert [e.uuids for e in fleet.plan.engines] == [[phys[1].uuid], [phys[0].uuid]]
        check_fleet(fleet)
    finally:
        reports = fleet.stop()
    check_teardown(reports)


def test_tp2_engine_under_reversed_devices(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    fleet = Fleet(FleetConfig(model=str(tiny_model), engines=1, tp_size=2, device="cuda", engine=ENGINE,
                              log_dir=str(tmp_path)))
    fleet.start()
    try:
        check_fleet(fleet)
    finally:
        check_teardown(fleet.stop())


@pytest.mark.parametrize("noset", [False, True])
def test_ray_places_each_engine_on_its_own_gpus(tiny_model, tmp_path, monkeypatch, noset):
    ray = pytest.importorskip("ray")
    if noset:
        monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    ray.init(num_gpus=NUM_GPUS, include_dashboard=False, log_to_driver=False)
    try:
        fleet = Fleet(FleetConfig(model=str(tiny_model), engines=2, tp_size=1, device="cuda", backend="ray",
                                  engine=ENGINE, log_dir=str(tmp_path), max_concurrent_starts=2))
        fleet.start()
        try:
            uuids = [u for e in fleet.plan.engines for u in e.uuids]
            assert len(set(uuids)) == 2 and all(u.startswith("GPU-") for u in uuids)
            check_fleet(fleet)
        finally:
            check_teardown(fleet.stop())
    finally:
        ray.shutdown()


def test_stale_gpu_processes_are_refused_then_reaped(tiny_model, tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", "import torch, time; x = torch.empty(2 << 30, dtype=torch.uint8, "
                            "device='cuda:0'); print('holding', flush=True); time.sleep(600)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "holding"
        cfg = FleetConfig(model=str(tiny_model), engines=1, tp_size=1, device="cuda", gpus=["0"],
                          engine=ENGINE, log_dir=str(tmp_path))
        with pytest.raises(StaleGPUProcesses, match=f"pid {hog.pid}"):
            Fleet(cfg).start()
        cfg.reap_stale = True
        fleet = Fleet(cfg)
        fleet.start()
        assert hog.wait(timeout=10) is not None
        check_teardown(fleet.stop())
    finally:
        hog.kill()


def test_colocation_example_on_gpu():
    example = Path(__file__).parents[1] / "examples" / "colocate.py"
    r = subprocess.run([sys.executable, str(example), "--device", "cuda", "--steps", "2"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("matches the trainer's greedy generation") == 2
