"""The doctor's rules on synthetic facts, and the command on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tpfleet.devices import PhysicalGPU
from tpfleet.doctor.rules import Facts, check, exit_code

GPUS = [PhysicalGPU(i, f"GPU-{i:08x}-0000-0000-0000-{i:012x}", "NVIDIA H200") for i in range(4)]
SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def codes(env=None, **facts):
    f = Facts(env={**SAFE, **(env or {})}, gpus=facts.pop("gpus", GPUS), **facts)
    return {x.code: x for x in check(f)}


def test_a_clean_machine_has_no_findings():
    found = codes(shm_bytes=64 << 30, p2p={(0, 1): "NV18"}, ipc={(0, 1): "ok", (1, 0): "ok"})
    assert found == {}
    assert exit_code(list(found.values())) == 0


@pytest.mark.parametrize("env,code,level", [
    ({"NCCL_NVLS_ENABLE": "1"}, "nvls-forced", "error"),
    ({"TORCH_SYMM_MEM_DISABLE_MULTICAST": ""}, "symm-mem-multicast", "warn"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}, "expandable-segments-ipc", "warn"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, "async-allocator-ipc", "warn"),
    ({"LD_PRELOAD": "/usr/lib/torch_memory_saver_hook.so"}, "allocator-hook-ipc", "warn"),
    ({"CUDA_VISIBLE_DEVICES": "0,7,1"}, "cvd-invalid-entry", "error"),
    ({"CUDA_VISIBLE_DEVICES": "1,1"}, "cvd-invalid", "error"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "cvd-empty", "error"),
    ({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}, "ray-noset", "warn"),
    ({"NCCL_P2P_DISABLE": "1"}, "nccl-p2p-disable", "warn"),
])
def test_environment_rules(env, code, level):
    found = codes(env, shm_bytes=64 << 30)
    assert code in found and found[code].level == level
    assert found[code].message and found[code].fix
    assert exit_code(list(found.values())) == (1 if level == "error" else 0)


def test_machine_facts_rules():
    found = codes(shm_bytes=64 << 20, p2p={(0, 1): "none"}, ipc={(0, 1): "RuntimeError: invalid argument"},
                  gpu_processes=[{"uuid": GPUS[0].uuid, "pid": 42, "name": "python train.py", "used_bytes": 80 << 30}])
    assert {"small-shm", "no-p2p", "ipc-broken", "gpu-memory-held"} <= set(found)
    assert "pid 42" in found["gpu-memory-held"].message and "invalid argument" in found["ipc-broken"].message
    mixed = codes(gpus=[GPUS[0], PhysicalGPU(1, "GPU-x", "NVIDIA A100")], shm_bytes=64 << 30)
    assert "device-order" in mixed
    assert "device-order" not in codes({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                                       gpus=[GPUS[0], PhysicalGPU(1, "GPU-x", "NVIDIA A100")], shm_bytes=64 << 30)


def test_ray_differences_are_reported():
    found = check(Facts(env=SAFE, ray_env_diff={"CUDA_VISIBLE_DEVICES": (None, "3"), "OMP_NUM_THREADS": (None, "1")}))
    by = {(x.code, x.message.split(":")[0]): x.level for x in found}
    assert by[("ray-env-differs", "CUDA_VISIBLE_DEVICES")] == "warn"
    assert by[("ray-env-differs", "OMP_NUM_THREADS")] == "info"


def test_a_ray_gpu_id_that_is_not_the_actor_s_cuda0_is_flagged():
    from tpfleet.doctor.cli import report

    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: Ray says GPU 2, the actor sees every GPU
    trap = Facts(env=SAFE, gpus=GPUS, shm_bytes=64 << 30, ray_gpu_ids=["2"], ray_visible_devices=None)
    message = {x.code: x.message for x in check(trap)}["ray-gpu-id-is-not-cuda0"]
    assert "given GPU 2" in message and f"opens GPU 0 ({GPUS[0].uuid})" in message
    assert f"ray.get_gpu_ids()=['2'], CUDA_VISIBLE_DEVICES=None: cuda:0 -> GPU 0 ({GPUS[0].uuid})" in report(trap, [])
    masked = Facts(env=SAFE, gpus=GPUS, shm_bytes=64 << 30, ray_gpu_ids=["2"], ray_visible_devices="2")
    assert "ray-gpu-id-is-not-cuda0" not in {x.code for x in check(masked)}
    assert f"cuda:0 -> GPU 2 ({GPUS[2].uuid})" in report(masked, [])


def run_doctor(*args, env=None, unset=()):
    import os

    child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "tpfleet.cli", "doctor", *args], capture_output=True, text=True,
                          env=child_env, timeout=300)


def test_doctor_command_exit_status_and_json():
    ok = run_doctor("--json", env={"NCCL_NVLS_ENABLE": "0"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert isinstance(json.loads(ok.stdout)["findings"], list)
    bad = run_doctor(env={"NCCL_NVLS_ENABLE": "1"})
    assert bad.returncode == 1 and "[error] nvls-forced" in bad.stdout and "fix:" in bad.stdout


def test_a_gpu_that_is_not_there_is_an_error():
    """`--gpus 64`: no machine here has 65 GPUs, so the answer must say so, not "no problems found"."""
    r = run_doctor("--gpus", "64")
    assert r.returncode == 1 and "[error] gpu-not-found: --gpus names '64'" in r.stdout, r.stdout + r.stderr


def test_compare_ray_runs_a_real_actor():
    pytest.importorskip("ray")
    r = run_doctor("--compare-ray", "--json", unset=("OMP_NUM_THREADS",))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    diff = json.loads(r.stdout)["ray_env_diff"]
    # Ray pins its workers' OpenMP threads to their CPU share; a plain process is left alone.
    assert diff["OMP_NUM_THREADS"] == [None, "1"]


def test_gpu_lines_show_free_memory_and_holders():
    from tpfleet.doctor.cli import report

    held = [{"uuid": GPUS[1].uuid, "pid": 4242, "name": "python train.py", "used_bytes": 30 << 30}]
    memory = {GPUS[0].uuid: (1 << 30, 140 << 30), GPUS[1].uuid: (31 << 30, 140 << 30)}
    f = Facts(env=SAFE, gpus=GPUS[:2], gpu_processes=held, gpu_memory=memory, shm_bytes=64 << 30)
    lines = report(f, check(f)).splitlines()
    assert "139.0 of 140.0 GiB free  processes: none" in lines[1]
    assert "109.0 of 140.0 GiB free  processes: pid 4242 30.0 GiB" in lines[2]


def test_p2p_matrix_cells_stay_apart():
    from tpfleet.doctor.cli import report

    p2p = {(i, j): "NV18" for i in range(4) for j in range(4) if i < j}
    ipc = {(i, j): "ok" for i in range(4) for j in range(4) if i != j}
    f = Facts(env=SAFE, gpus=GPUS, p2p=p2p, ipc=ipc, shm_bytes=64 << 30)
    lines = report(f, check(f)).splitlines()
    start = lines.index("P2P / NVLink (and CUDA IPC read test):")
    rows = lines[start + 2:start + 6]
    assert [r.split() for r in rows] == [[str(i)] + ["X" if i == j else "NV18/ipc-ok" for j in range(4)]
                                         for i in range(4)]
    assert len({len(r) for r in rows}) == 1  # aligned columns
