"""The fleet on CPU: plans, staggered start, fault diagnosis, teardown, routing, Ray, colocation."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tpfleet.config import EngineConfig
from tpfleet.devices import DeviceError, PhysicalGPU, parse_visible_devices
from tpfleet.fleet import EngineFailure, Fleet, FleetConfig
from tpfleet.fleet.placement import BundleFacts, plan_from_bundles, plan_placement, select_gpus
from tpfleet.fleet.processes import members
from tpfleet.phases import PHASES

GPUS = [PhysicalGPU(i, f"GPU-{i:08x}-1111-2222-3333-{i:012x}") for i in range(8)]
SMALL_KV = {"kv_cache_tokens": 4096}
TWO_TOKENS = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}


# --- placement ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cvd,gpus_arg,physical", [
    (None, None, [[0, 1], [2, 3]]),
    ("4,5,6,7", None, [[4, 5], [6, 7]]),
    ("3,2,1,0", None, [[3, 2], [1, 0]]),
    ("1,0,3,2", ["2", "3", "0", "1"], [[3, 2], [1, 0]]),  # --gpus indexes the launcher's visible list
    (",".join(g.uuid for g in GPUS[4:8]), None, [[4, 5], [6, 7]]),
    ("4,5,6,7", [GPUS[7].uuid, GPUS[5].uuid], [[7, 5]]),
])
def test_plan_assigns_uuids_and_local_indices(cvd, gpus_arg, physical):
    visible = parse_visible_devices(cvd, GPUS)
    chosen = select_gpus(gpus_arg, visible)
    plan = plan_placement(chosen, len(physical), 2, "host-a")
    assert [[r.physical_index for r in e.ranks] for e in plan.engines] == physical
    for e in plan.engines:
        assert [r.local_index for r in e.ranks] == [0, 1]  # the engine sees only its own GPUs, in rank order
        assert e.cuda_visible_devices.split(",") == [GPUS[p].uuid for p in [r.physical_index for r in e.ranks]]
        assert all(r.host == "host-a" for r in e.ranks)


def test_plan_errors_name_the_problem():
    with pytest.raises(DeviceError, match="need 6 GPUs; only 4"):
        plan_placement(GPUS[:4], 3, 2)
    with pytest.raises(DeviceError, match="out of range"):
        select_gpus(["4"], parse_visible_devices("0,1,2,3", GPUS))
    with pytest.raises(DeviceError, match="twice"):
        select_gpus(["1", "1"], GPUS)


def test_plan_from_bundles_takes_the_gpus_each_bundle_reports():
    bundles = [BundleFacts("host-a", "10.0.0.1", ("3", "1"), (GPUS[3].uuid, GPUS[1].uuid), None),
               BundleFacts("host-b", "10.0.0.2", (GPUS[5].uuid, GPUS[4].uuid), (GPUS[5].uuid, GPUS[4].uuid), "")]
    plan = plan_from_bundles(bundles, 2, with_gpus=True)
    assert [e.uuids for e in plan.engines] == [[GPUS[3].uuid, GPUS[1].uuid], [GPUS[5].uuid, GPUS[4].uuid]]
    assert [[r.physical_index for r in e.ranks] for e in plan.engines] == [[3, 1], [-1, -1]]  # UUIDs: no index
    assert [[r.local_index for r in e.ranks] for e in plan.engines] == [[0, 1], [0, 1]]
    assert [e.host for e in plan.engines] == ["host-a", "host-b"]
    assert [e.host for e in plan_from_bundles(bundles, 2, with_gpus=True, use_node_ip=True).engines] == \
        ["10.0.0.1", "10.0.0.2"]
    assert [e.ranks for e in plan_from_bundles(bundles, 2, with_gpus=False).engines] == [(), ()]
    with pytest.raises(DeviceError, match="TP 4 needs 4"):
        plan_from_bundles(bundles, 4, with_gpus=True)
    twice = [bundles[0], BundleFacts("host-a", "10.0.0.1", ("1", "2"), (GPUS[1].uuid, GPUS[2].uuid), None)]
    with pytest.raises(DeviceError, match=f"{GPUS[1].uuid} was granted to engines 0 and 1"):
        plan_from_bundles(twice, 2, with_gpus=True)


def test_each_engine_of_a_fleet_draws_its_own_noise():
    """One seed for all would give every engine the same random stream: the samples of a group sent to
    different engines would repeat one another."""
    cfg = FleetConfig(model="m", engines=3)
    assert [cfg.engine_config([], i).seed for i in range(3)] == [0, 1, 2]
    cfg = FleetConfig(model="m", engines=2, engine={"seed": 7})
    assert [cfg.engine_config([], i).seed for i in range(2)] == [7, 8]


def test_fleet_config_checks_its_engine_fields():
    cfg = FleetConfig(model="m", tp_size=2, engine={"kv_cache_tokens": 4096, "enable_prefix_caching": False})
    assert cfg.engine_config(["GPU-a", "GPU-b"]) == EngineConfig(
        model="m", tp_size=2, kv_cache_tokens=4096, enable_prefix_caching=False, gpu_uuids=["GPU-a", "GPU-b"])
    with pytest.raises(ValueError, match="unknown engine config field 'kv_cache'"):
        FleetConfig(model="m", engine={"kv_cache": 4096})
    with pytest.raises(ValueError, match="'kv_cache_tokens' must be an integer or null"):
        FleetConfig(model="m", engine={"kv_cache_tokens": "4096"})
    with pytest.raises(ValueError, match="FleetConfig.tp_size"):
        FleetConfig(model="m", engine={"tp_size": 2})
    with pytest.raises(ValueError, match="placement plan"):
        FleetConfig(model="m", engine={"gpu_uuids": ["GPU-a"]})
    with pytest.raises(ValueError, match="backend"):
        FleetConfig(model="m", backend="slurm")


# --- start, diagnose, stop ------------------------------------------------------------------------

def _fleet(model, tmp_path, **kw) -> tuple[Fleet, list]:
    events = []
    cfg = FleetConfig(model=str(model), log_dir=str(tmp_path / "logs"), engine=SMALL_KV, **kw)
    return Fleet(cfg, on_event=lambda e, ev, info: events.append((time.monotonic(), e, ev, info))), events


def _max_concurrently_starting(events) -> int:
    live, peak = set(), 0
    for _, e, ev, _ in sorted(events, key=lambda x: x[0]):
        if ev == "spawned":
            live.add(e)
        elif ev == "healthy":
            live.discard(e)
        peak = max(peak, len(live))
    return peak


@pytest.mark.parametrize("k", [1, 2])
def test_start_respects_the_concurrency_limit_and_leaves_nothing(tiny_model, tmp_path, k):
    fleet, events = _fleet(tiny_model, tmp_path, engines=3, max_concurrent_starts=k)
    infos = fleet.start()
    try:
        assert [i.state for i in infos] == ["ready"] * 3
        assert len({i.url for i in infos}) == 3
        assert _max_concurrently_starting(events) == k
        for url in fleet.urls:
            assert httpx.post(f"{url}/generate", json=TWO_TOKENS).status_code == 200
        sessions = [(e.proc.pid, e.marker) for e in fleet.engines]
    finally:
        reports = fleet.stop()
    assert all(r.leftover == [] for r in reports)
    assert all(members(sid, marker) == [] for sid, marker in sessions)


def test_a_clean_stop_is_not_recorded_as_a_rank_death(tiny_model, tmp_path):
    """The driver is told first and stops its own ranks: signalled with them, a rank that died first was
    written up as the engine's crash (exit record, exit code 70)."""
    fleet, _ = _fleet(tiny_model, tmp_path, engines=1, tp_size=2)
    fleet.start()
    [report] = fleet.stop()
    assert report.leftover == []
    assert sorted(p.name for p in fleet.log_dir.glob("engine0.exit.json*")) == []
    assert "CRITICAL" not in (fleet.log_dir / "engine0.log").read_text()


def _kill_when(events, phase, sig, which):
    """on_event hook: send `sig` to rank `which` as soon as the engine reports `phase`."""
    def hook(engine, event, info):
        events.append((time.monotonic(), engine, event, info))
        if event == phase:
            pids = info.get("pids") or []
            os.kill(pids[which], sig)
    return hook


@pytest.mark.parametrize("sig,name", [(signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV")])
def test_a_rank_killed_during_startup_is_diagnosed_fast(tiny_model, tmp_path, sig, name):
    events = []
    cfg = FleetConfig(model=str(tiny_model), tp_size=2, log_dir=str(tmp_path), engine=SMALL_KV,
                      startup_timeout_s=120)
    fleet = Fleet(cfg, on_event=_kill_when(events, "ranks_started", sig, 1))
    t = time.monotonic()
    with pytest.raises(EngineFailure) as e:
        fleet.start()
    assert time.monotonic() - t < 20  # far inside the 120 s deadline
    killed_at = next(ts for ts, _, ev, _ in events if ev == "ranks_started")
    assert time.monotonic() - killed_at < 5 + 3  # diagnosed within 5 s (+ the teardown that follows)
    text = str(e.value)
    assert "rank 1" in text and f"killed by {name}" in text
    assert "engine 0 failed" in text and "phase" in text and "last lines of" in text
    if name == "SIGKILL":
        assert "OOM" in text


def test_a_rank_killed_while_serving_takes_the_engine_down_and_is_restarted(tiny_model, tmp_path):
    fleet, events = _fleet(tiny_model, tmp_path, engines=1, tp_size=2, restart_budget=1, restart_backoff_s=0.2)
    fleet.start()
    try:
        pids = next(info["pids"] for _, _, ev, info in events if ev == "ranks_started")
        t = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        while not any(ev == "died" for _, _, ev, _ in events):
            assert time.monotonic() - t < 5, "death not noticed within 5 s"
            time.sleep(0.05)
        assert wait_for(lambda: fleet.urls and fleet.engines[0].proc.pid != pids[0], 60)
        assert fleet.restarts[0] == 1
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    finally:
        fleet.stop()


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_an_exception_while_loading_weights_fails_fast_with_its_traceback(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated download
    fleet, events = _fleet(broken, tmp_path, startup_timeout_s=120)
    t = time.monotonic()
    with pytest.raises(EngineFailure) as e:
        fleet.start()
    assert time.monotonic() - t < 30
    text = str(e.value)
    assert e.value.phase in ("starting", "ranks_started")  # before weights_loaded
    assert "Traceback" in text and "exit code 1" in text


def test_an_engine_that_fails_at_start_is_reported_from_its_exit_record(tiny_model, tmp_path):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    fleet, events = _fleet(not_a_checkpoint, tmp_path, startup_timeout_s=120)
    with pytest.raises(EngineFailure) as e:
        fleet.start()
    failure = e.value
    engine = fleet.engines[0]
    # The engine got its whole config as one document, and wrote why it failed to the path it was given.
    assert EngineConfig.from_file(engine.config_path) == fleet.cfg.engine_config([])
    assert "--config" in engine.command() and "--model" not in engine.command()
    assert failure.exit_record_path == str(tmp_path / "logs" / "engine0.exit.json")
    assert Path(failure.exit_record_path).is_file()
    cause = failure.exit
    assert cause is not None and cause.role == "engine" and cause.phase == "starting"
    assert cause.exc_type and cause.pid == engine.proc.pid and cause.traceback
    assert f"{cause.exc_type}: " in failure.reason and "in phase starting" in failure.reason
    # A checkpoint that is not one is a usage error, refused before the engine starts: exit code 2.
    assert f"raised {cause.exc_type}" in str(failure) and "exit code 2" in str(failure)


def test_an_engine_killed_while_serving_is_reported_from_its_exit_status(tiny_model, tmp_path):
    fleet, events = _fleet(tiny_model, tmp_path, engines=1, restart_budget=0)
    fleet.start()
    try:
        engine = fleet.engines[0]
        os.kill(engine.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: any(ev == "died" for _, _, ev, _ in events), 5), "death not noticed within 5 s"
        [failure] = fleet.failures
        cause = failure.exit
        assert cause is not None and cause.signal == "SIGKILL" and cause.exitcode == -signal.SIGKILL
        assert cause.exc_type is None and cause.role == "engine" and cause.pid == engine.proc.pid
        assert cause.phase == "ready"  # the last phase it reported
        assert not Path(failure.exit_record_path).exists()  # it could write nothing: the record is the launcher's
        assert "killed by SIGKILL" in failure.reason and "died while serving" in failure.reason
        assert "rank 0" in str(failure) and "OOM" in str(failure)
        assert wait_for(lambda: fleet.urls == [], 5)
    finally:
        fleet.stop()


def test_a_hang_during_startup_misses_its_deadline_with_the_phase_named(tiny_model, tmp_path):
    events = []
    cfg = FleetConfig(model=str(tiny_model), log_dir=str(tmp_path), engine=SMALL_KV, startup_timeout_s=6)

    def freeze(engine, event, info):
        events.append(event)
        if event == "weights_loaded":
            os.kill(fleet.engines[0].proc.pid, signal.SIGSTOP)

    fleet = Fleet(cfg, on_event=freeze)
    t = time.monotonic()
    with pytest.raises(EngineFailure) as e:
        fleet.start()
    assert 6 <= time.monotonic() - t < 25
    reached = [ev for ev in events if ev in PHASES]
    assert "deadline" in e.value.reason and e.value.phase == reached[-1]
    assert members(fleet.engines[0].proc.pid, fleet.engines[0].marker) == []


def test_a_taken_port_is_reported_not_raced(tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = FleetConfig(model=str(tiny_model), log_dir=str(tmp_path), engine_port=port, startup_timeout_s=60)
        with pytest.raises(EngineFailure) as e:
            Fleet(cfg).start()
    assert f"cannot listen on 127.0.0.1:{port}" in str(e.value)


# --- routing --------------------------------------------------------------------------------------

def _serve_router(fleet):
    import uvicorn

    from tpfleet.fleet.router import create_router_app
    from tpfleet.server.launch import bind_socket, url_of

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_router_app(fleet), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 10)
    return server, url_of(sock)


def test_router_spreads_load_and_survives_an_engine_death(tiny_model, tmp_path):
    fleet, events = _fleet(tiny_model, tmp_path, engines=2, max_concurrent_starts=2, restart_budget=1,
                           restart_backoff_s=0.2)
    fleet.start()
    server, url = _serve_router(fleet)
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 16, "ignore_eos": True}}
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(f"{url}/generate", json=body, timeout=60)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 6
        served = httpx.get(f"{url}/fleet").json()["served"]
        assert served.get("0", 0) >= 2 and served.get("1", 0) >= 2
        dead = fleet.engines[0]
        os.kill(dead.proc.pid, signal.SIGKILL)
        for _ in range(8):  # every request is answered while engine 0 is down and restarting
            assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 200
        with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        assert wait_for(lambda: any(ev == "died" for _, _, ev, _ in events), 5)
        assert wait_for(lambda: len(fleet.urls) == 2, 60) and fleet.restarts[0] == 1
        workers = httpx.get(f"{url}/workers").json()["workers"]  # the restarted engine replaced the dead one
        assert sorted((w["engine"], w["url"]) for w in workers) == sorted((e.engine, e.url) for e in fleet.engines)
        assert httpx.post(f"{url}/generate", content=b'{"text": ""}').status_code == 400  # errors pass through
    finally:
        server.should_exit = True
        fleet.stop()


# Ray placement: tests/test_ray_placement.py (one shared two-node cluster).


# --- the CLI and colocation -----------------------------------------------------------------------

def test_launch_cli_serves_a_router_and_tears_down_on_sigterm(tiny_model, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tpfleet.cli", "launch", "--model", str(tiny_model),
                             "--engines", "2",
                             "--tp", "1", "--max-concurrent-starts", "2", "--log-dir", str(tmp_path),
                             "--engine-arg=--kv-cache-tokens", "--engine-arg=4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, url = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("tpfleet router ready:"):
            url = line.split()[3]
            break
    assert url, "".join(lines)
    assert any("startup s" in line for line in lines) and any("kv_cache_allocated" in line for line in lines)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0
    assert rest.count("processes left: none") == 2, rest


def test_colocation_example_alternates_training_and_rollouts(tmp_path):
    example = Path(__file__).parents[1] / "examples" / "colocate.py"
    r = subprocess.run([sys.executable, str(example), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("matches the trainer's greedy generation") == 2


def test_failed_restarts_use_the_budget_and_leave_nothing_running(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    fleet, events = _fleet(model, tmp_path, engines=1, restart_budget=2, restart_backoff_s=0.1)
    fleet.start()
    try:
        shard = sorted(model.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:100])  # every restart will now fail to load weights
        os.kill(fleet.engines[0].proc.pid, signal.SIGKILL)
        assert wait_for(lambda: fleet.restarts.get(0) == 2 and fleet.engines[0].state.value == "stopped", 120)
        assert fleet.urls == []
        [info] = fleet.info()  # what the router's /fleet shows: down, and why
        assert info.state == "failed" and info.restarts == 2 and info.failure == fleet.failures[-1].reason
        last = fleet.engines[0]
        assert members(last.proc.pid, last.marker) == []  # the failed attempt was cleaned up
    finally:
        fleet.stop()


def test_a_fleet_removes_the_log_directory_it_made_once_stopped_cleanly(tiny_model):
    fleet = Fleet(FleetConfig(model=str(tiny_model), engine=SMALL_KV))
    fleet.start()
    assert (fleet.log_dir / "engine0.log").is_file()
    fleet.stop()
    assert not fleet.log_dir.exists()
