"""Text and JSON reports of the doctor's findings."""

from __future__ import annotations

import json

from tpfleet.devices import parse_visible_devices
from tpfleet.doctor.facts import gather
from tpfleet.doctor.rules import Facts, check, exit_code


def report(f: Facts, findings) -> str:
    lines = []
    if f.gpus:
        lines.append("GPUs:")
        held = {}
        for p in f.gpu_processes:
            held.setdefault(p["uuid"], []).append(f"pid {p['pid']} {p['used_bytes'] / 2**30:.1f} GiB")
        for g in f.gpus:
            used, total = f.gpu_memory.get(g.uuid, (None, None))
            free = f"{(total - used) / 2**30:.1f} of {total / 2**30:.1f} GiB free" if total else "free memory unknown"
            lines.append(f"  {g.index}  {g.uuid}  {g.name}  {free}  processes: "
                         f"{', '.join(held.get(g.uuid, [])) or 'none'}")
        if f.p2p:
            idx = [g.index for g in f.gpus]
            lines.append("P2P / NVLink (and CUDA IPC read test):")
            rows = {}
            for i in idx:
                cells = []
                for j in idx:
                    if i == j:
                        cells.append("X")
                    else:
                        link = f.p2p.get((min(i, j), max(i, j)), "?")
                        ipc = f.ipc.get((i, j))
                        if ipc is not None:
                            link += "/ipc-" + ("ok" if ipc == "ok" else "FAIL")
                        cells.append(link)
                rows[i] = cells
            w = 2 + max(len(c) for cells in rows.values() for c in cells)
            lines.append("      " + "".join(f"{j:>{w}}" for j in idx))
            lines += [f"  {i:>4}" + "".join(f"{c:>{w}}" for c in cells) for i, cells in rows.items()]
        cvd = f.env.get("CUDA_VISIBLE_DEVICES")
        try:
            mapping = parse_visible_devices(cvd, f.gpus)
            lines.append(f"CUDA_VISIBLE_DEVICES={cvd!r}: " + ", ".join(f"cuda:{k} -> GPU {g.index} ({g.uuid})"
                                                                     for k, g in enumerate(mapping)))
        except Exception as e:  # noqa: BLE001 - reported as a finding too
            lines.append(f"CUDA_VISIBLE_DEVICES={cvd!r}: {e}")
        if f.ray_gpu_ids:
            try:
                seen = ", ".join(f"cuda:{k} -> GPU {g.index} ({g.uuid})"
                                 for k, g in enumerate(parse_visible_devices(f.ray_visible_devices, f.gpus)))
            except Exception as e:  # noqa: BLE001
                seen = str(e)
            lines.append(f"Ray actor (num_gpus=1): ray.get_gpu_ids()={f.ray_gpu_ids}, "
                         f"CUDA_VISIBLE_DEVICES={f.ray_visible_devices!r}: {seen}")
    else:
        lines.append("GPUs: none found (no NVIDIA driver or NVML on this machine)")
    lines.append("")
    if not findings:
        lines.append("no problems found")
    for x in findings:
        lines.append(f"[{x.level}] {x.code}: {x.message}")
        lines.append(f"        fix: {x.fix}")
    return "\n".join(lines)


def doctor_command(gpus: list[str] | None, compare_ray: bool, as_json: bool) -> int:
    f = gather(gpus_wanted=gpus, compare_ray=compare_ray)
    findings = check(f)
    if as_json:
        memory = {u: {"used_bytes": used, "total_bytes": total} for u, (used, total) in f.gpu_memory.items()}
        print(json.dumps({"gpus": [{**vars(g), **memory.get(g.uuid, {})} for g in f.gpus],
                          "gpu_processes": f.gpu_processes,
                          "p2p": {f"{i},{j}": v for (i, j), v in f.p2p.items()},
                          "ipc": {f"{i},{j}": v for (i, j), v in f.ipc.items()},
                          "ray_env_diff": {k: list(v) for k, v in (f.ray_env_diff or {}).items()},
                          "ray_gpu_ids": f.ray_gpu_ids, "ray_visible_devices": f.ray_visible_devices,
                          "findings": [x.to_dict() for x in findings]}, indent=1))
    else:
        print(report(f, findings))
    return exit_code(findings)
