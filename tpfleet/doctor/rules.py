"""Checks over a snapshot of the launch environment. Pure functions: every rule is testable on any machine.

Each finding has a level (error: a launch will fail or hang; warn: it may, or will be slow; info),
a one-line explanation and a suggested fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tpfleet.devices import DeviceError, PhysicalGPU, parse_visible_devices


@dataclass(frozen=True)
class Finding:
    level: str  # "error", "warn" or "info"
    code: str
    message: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Facts:
    env: dict[str, str]
    gpus: list[PhysicalGPU] = field(default_factory=list)
    gpus_not_found: list[str] = field(default_factory=list)  # asked for (--gpus) and matching no GPU here
    gpu_processes: list[dict] = field(default_factory=list)  # {uuid, pid, name, used_bytes}
    gpu_memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # uuid -> (bytes used, bytes total)
    p2p: dict[tuple[int, int], str] = field(default_factory=dict)  # (i, j) -> "NV18", "PIX", "none", ...
    ipc: dict[tuple[int, int], str] = field(default_factory=dict)  # (i, j) -> "ok" or the error
    shm_bytes: int | None = None
    ray_env_diff: dict[str, tuple[str | None, str | None]] | None = None  # name -> (plain, ray actor)
    ray_gpu_ids: list[str] = field(default_factory=list)  # ray.get_gpu_ids() in an actor holding one GPU
    ray_visible_devices: str | None = None  # that actor's CUDA_VISIBLE_DEVICES


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def check(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    env = f.env

    for wanted in f.gpus_not_found:
        out.append(Finding("error", "gpu-not-found", f"--gpus names {wanted!r}, which is no GPU's index or UUID "
                           "prefix here", "run `nvidia-smi -L` for this machine's GPUs"))

    if env.get("NCCL_NVLS_ENABLE", "").strip() not in ("", "0"):
        out.append(Finding("error", "nvls-forced", f"NCCL_NVLS_ENABLE={env['NCCL_NVLS_ENABLE']} forces NVLink "
                           "SHARP/multicast; without multicast support (or where it must stay off) NCCL start-up "
                           "fails or hangs, and on shared hosts it can take the GPUs out of service",
                           "set NCCL_NVLS_ENABLE=0 (tpfleet sets it for its own processes)"))
    if not _truthy(env.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")) and f.gpus:
        out.append(Finding("warn", "symm-mem-multicast", "PyTorch symmetric memory may use NVLink multicast "
                           "(TORCH_SYMM_MEM_DISABLE_MULTICAST is not set)",
                           "export TORCH_SYMM_MEM_DISABLE_MULTICAST=1"))

    conf = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        out.append(Finding("warn", "expandable-segments-ipc", "PYTORCH_CUDA_ALLOC_CONF enables expandable segments: "
                           "that memory cannot be exported with cudaIpcGetMemHandle, so custom all-reduces that "
                           "register PyTorch buffers fail in CUDA-graph capture with 'invalid argument' "
                           "(tpfleet's own allocates its buffers itself and is unaffected)",
                           "drop expandable_segments for inference engines that use a custom all-reduce"))
    if "backend:cudamallocasync" in conf.replace(" ", "").lower():
        out.append(Finding("warn", "async-allocator-ipc", "PYTORCH_CUDA_ALLOC_CONF selects cudaMallocAsync: pool "
                           "memory needs pool-specific IPC handles, so IPC-based all-reduces that register "
                           "PyTorch tensors fail", "use the native allocator (remove backend:cudaMallocAsync)"))
    preload = env.get("LD_PRELOAD", "")
    if "memory_saver" in preload or "torch_memory_saver" in preload:
        out.append(Finding("warn", "allocator-hook-ipc", "LD_PRELOAD installs an allocator hook (torch_memory_saver): "
                           "memory it hands out is virtual-memory backed and cannot be exported over CUDA IPC; graph "
                           "inputs living there break IPC custom all-reduces", "keep graph inputs out of hooked memory "
                           "(tpfleet's communicator owns its buffers), or disable the memory saver"))

    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if f.gpus and cvd is not None:
        try:
            visible = parse_visible_devices(cvd, f.gpus)
            entries = [e for e in cvd.split(",") if e.strip()]
            if len(visible) < len(entries):
                out.append(Finding("error", "cvd-invalid-entry", f"CUDA_VISIBLE_DEVICES={cvd!r}: entry "
                                   f"{entries[len(visible)]!r} names no GPU, so CUDA ignores it and every entry after "
                                   f"it; this process sees {len(visible)} GPUs", "list only existing GPUs"))
            if not visible and entries:
                out.append(Finding("error", "cvd-empty", f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU",
                                   "unset it or name real GPUs"))
        except DeviceError as e:
            out.append(Finding("error", "cvd-invalid", str(e), "name each GPU once, by index or full UUID"))
    names = {g.name for g in f.gpus}
    if len(names) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        out.append(Finding("warn", "device-order", "the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA's "
                           "indices then differ from nvidia-smi's and NVML's", "export CUDA_DEVICE_ORDER=PCI_BUS_ID"))
    if _truthy(env.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")):
        out.append(Finding("warn", "ray-noset", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: every Ray actor sees "
                           "all GPUs, so each one's cuda:0 is the same device unless the launcher remaps it",
                           "let tpfleet place engines (it passes GPUs by UUID), or unset it"))
    for name in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"):
        if _truthy(env.get(name)):
            out.append(Finding("warn", name.lower().replace("_", "-"), f"{name}=1 forces NCCL off its fast path "
                               "between GPUs of one host", f"unset {name} unless debugging"))

    for p in f.gpu_processes:
        out.append(Finding("warn", "gpu-memory-held", f"pid {p['pid']} holds {p['used_bytes'] / 2**30:.1f} GiB on "
                           f"{p['uuid']} ({p['name']})", "stop it, or launch with --reap-stale"))
    for (i, j), link in sorted(f.p2p.items()):
        if link == "none":
            out.append(Finding("warn", "no-p2p", f"GPUs {i} and {j} have no peer-to-peer path: IPC all-reduces fall "
                               "back to NCCL", "place TP ranks on GPUs linked by NVLink (see the matrix)"))
    for (i, j), status in sorted(f.ipc.items()):
        if status != "ok":
            out.append(Finding("error", "ipc-broken", f"CUDA IPC from GPU {i} to GPU {j} failed: {status}",
                               "check the container's IPC namespace (--ipc=host) and P2P settings"))
    if f.shm_bytes is not None and f.shm_bytes < 1 << 30:
        out.append(Finding("warn", "small-shm", f"/dev/shm has {f.shm_bytes / 2**20:.0f} MiB: NCCL and PyTorch "
                           "workers die with SIGBUS when it runs out", "give the container --shm-size=16g or more"))
    if f.ray_gpu_ids and f.gpus:
        try:
            cuda0 = next(iter(parse_visible_devices(f.ray_visible_devices, f.gpus)), None)
        except DeviceError:
            cuda0 = None  # reported by the CUDA_VISIBLE_DEVICES rules when it is this process's too
        if cuda0 is not None and str(cuda0.index) != f.ray_gpu_ids[0]:
            out.append(Finding("warn", "ray-gpu-id-is-not-cuda0",
                               f"a Ray actor given GPU {f.ray_gpu_ids[0]} (ray.get_gpu_ids()) opens GPU {cuda0.index} "
                               f"({cuda0.uuid}) as cuda:0 (its CUDA_VISIBLE_DEVICES={f.ray_visible_devices!r}): "
                               "code that uses cuda:0, or Ray's id as a local index, lands on another GPU",
                               "map Ray's ids through CUDA_VISIBLE_DEVICES to UUIDs (tpfleet's placement does), "
                               "or unset RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"))
    for name, (plain, actor) in sorted((f.ray_env_diff or {}).items()):
        level = "warn" if name in ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD") or \
            name.startswith("NCCL_") else "info"
        out.append(Finding(level, "ray-env-differs", f"{name}: plain process {plain!r}, Ray actor {actor!r}",
                           "set it in Ray's runtime_env, or have the launcher set it per engine"))
    return out


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == "error" for f in findings) else 0
