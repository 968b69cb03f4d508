"""Gathering what the rules look at: NVML, a real CUDA IPC test per GPU pair, /dev/shm, Ray."""

from __future__ import annotations

import os

from tpfleet.doctor.rules import Facts


def gather(env: dict[str, str] | None = None, gpus_wanted: list[str] | None = None, compare_ray: bool = False,
           test_ipc: bool = True) -> Facts:
    f = Facts(env=dict(env if env is not None else os.environ))
    try:
        f.shm_bytes = os.statvfs("/dev/shm").f_bsize * os.statvfs("/dev/shm").f_blocks
    except OSError:
        pass
    try:
        from tpfleet.devices import physical_gpus

        f.gpus = physical_gpus()
    except Exception:  # noqa: BLE001 - no driver, no NVML: a CPU machine
        f.gpus = []
    if gpus_wanted:
        def named(g, w: str) -> bool:
            return str(g.index) == w or g.uuid.startswith(w)
        f.gpus_not_found = [w for w in gpus_wanted if not any(named(g, w) for g in f.gpus)]
        f.gpus = [g for g in f.gpus if any(named(g, w) for w in gpus_wanted)]
    if f.gpus:
        _nvml_facts(f)
        if test_ipc and len(f.gpus) > 1:
            f.ipc = ipc_matrix([g.index for g in f.gpus])
    if compare_ray:
        actor = ray_actor_view(bool(f.gpus))
        f.ray_env_diff = env_diff(actor["env"])
        f.ray_gpu_ids = actor["gpu_ids"]
        f.ray_visible_devices = actor["env"].get("CUDA_VISIBLE_DEVICES")
    return f


def _nvml_facts(f: Facts) -> None:
    import pynvml

    from tpfleet.fleet.gpu_state import memory_info, processes_on

    f.gpu_processes = [vars(p) for p in processes_on([g.uuid for g in f.gpus])]
    f.gpu_memory = memory_info([g.uuid for g in f.gpus])
    pynvml.nvmlInit()
    try:
        handles = {g.index: pynvml.nvmlDeviceGetHandleByIndex(g.index) for g in f.gpus}
        read = pynvml.NVML_P2P_CAPS_INDEX_READ
        read = read[0] if isinstance(read, tuple) else read  # some nvidia-ml-py releases define it as (0,)
        for i in handles:
            for j in handles:
                if i >= j:
                    continue
                ok = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], read) == pynvml.NVML_P2P_STATUS_OK
                over_nvlink = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                direct, switched = _nvlinks(pynvml, handles[i], pynvml.nvmlDeviceGetPciInfo(handles[j]).busId)
                links = direct or (switched if over_nvlink == pynvml.NVML_P2P_STATUS_OK else 0)
                f.p2p[(i, j)] = f"NV{links}" if links else ("PCIe" if ok else "none")
    finally:
        pynvml.nvmlShutdown()


def _nvlinks(pynvml, a, target_bus) -> tuple[int, int]:
    """GPU a's active NVLinks: those wired straight to the GPU on `target_bus`, and those to NVSwitches.
    On switched systems (HGX H100/H200) every pair talks through all of a GPU's switch links, which
    is what `nvidia-smi topo -m` reports as NV18."""
    direct = switched = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if not pynvml.nvmlDeviceGetNvLinkState(a, link):
                continue
        except pynvml.NVMLError:
            break  # past the device's last link
        try:
            to_switch = pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(a, link) == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
        except pynvml.NVMLError:  # older drivers: only the remote bus id is known
            to_switch = False
        if to_switch:
            switched += 1
        elif pynvml.nvmlDeviceGetNvLinkRemotePciInfo(a, link).busId == target_bus:
            direct += 1
    return direct, switched


def _ipc_reader(q_in, q_out, device: int) -> None:
    import torch

    torch.cuda.set_device(device)
    t = q_in.get(timeout=60)
    try:
        q_out.put("ok" if bool((t.to(device) == 42).all()) else "read back wrong data")
    except Exception as e:  # noqa: BLE001 - reported as the finding
        q_out.put(f"{type(e).__name__}: {e}")


def ipc_matrix(indices: list[int]) -> dict[tuple[int, int], str]:
    """Share a tensor on GPU i with a process working on GPU j, through CUDA IPC, and read it back."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for i in indices:
        t = torch.full((1 << 20,), 42, dtype=torch.int32, device=f"cuda:{i}")
        for j in indices:
            if i == j:
                continue
            q_in, q_out = ctx.Queue(), ctx.Queue()
            p = ctx.Process(target=_ipc_reader, args=(q_in, q_out, j))
            p.start()
            q_in.put(t)
            try:
                out[(i, j)] = q_out.get(timeout=90)
            except Exception as e:  # noqa: BLE001
                out[(i, j)] = f"no answer: {e}"
            p.join(timeout=30)
    return out


WATCHED = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD", "LD_LIBRARY_PATH", "CUDA_DEVICE_ORDER",
           "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
           "OMP_NUM_THREADS", "HOME", "PATH")


def watched_env() -> dict[str, str]:
    """This process's variables that change how GPUs, NCCL and allocators behave."""
    return {k: v for k, v in os.environ.items() if k in WATCHED or k.startswith("NCCL_")}


def _actor_view() -> dict:
    import ray as _ray

    return {"env": watched_env(), "gpu_ids": [str(i) for i in _ray.get_gpu_ids()]}


def ray_actor_view(with_gpu: bool) -> dict:
    """What a Ray actor (holding one GPU, if any) sees: its watched environment and ray.get_gpu_ids()."""
    import ray

    owns = not ray.is_initialized()
    if owns:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        return ray.get(ray.remote(num_gpus=1 if with_gpu else 0)(_actor_view).remote())
    finally:
        if owns:
            ray.shutdown()


def env_diff(actor_env: dict[str, str | None]) -> dict[str, tuple[str | None, str | None]]:
    """Watched variables whose value differs between this process and the actor: name -> (plain, actor)."""
    plain = watched_env()
    names = set(plain) | set(actor_env)
    return {k: (plain.get(k), actor_env.get(k)) for k in names if plain.get(k) != actor_env.get(k)}
