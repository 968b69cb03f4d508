"""Just-in-time builds of tpfleet's CUDA libraries, cached on disk.

A build is keyed by the source's hash, the GPU architecture, the compiler's version and the flags,
so a cache entry is reused only when it would be rebuilt identically. Concurrent builders (the
ranks of one engine, or several engines) serialise on a file lock and the library appears under its
final name atomically. Every lookup is counted, so start-up can report hits, misses and the
seconds spent compiling.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpfleet import env

log = logging.getLogger("tpfleet.jit")


class JitUnavailable(RuntimeError):
    """No toolchain, or the build failed: callers fall back to a path that needs no compilation."""


def default_triton_cache() -> None:
    """Keep Triton's kernels beside tpfleet's own JIT cache (unless TRITON_CACHE_DIR says otherwise),
    so that `tpfleet warmup` fills the cache every engine reads, however the engine was started.
    Set before any rank is spawned: the ranks inherit it."""
    os.environ.setdefault(env.TRITON_CACHE_DIR, str(env.cache_root() / "triton"))


def write_atomic(path: str | Path, text: str) -> None:
    """Write a cache file so readers see the old version or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class JitStats:
    """This process's just-in-time work by kind (nvcc, triton, tuning): cache hits, misses and the
    seconds spent, found or built, so a warm start can show that it did (almost) nothing."""

    kinds: dict[str, list] = field(default_factory=dict)  # kind -> [hits, misses, seconds]
    entries: list[str] = field(default_factory=list)  # cache entries used, for warm-up done-markers

    def record(self, kind: str, hit: bool, seconds: float) -> None:
        k = self.kinds.setdefault(kind, [0, 0, 0.0])
        k[0 if hit else 1] += 1
        k[2] += seconds

    @property
    def hits(self) -> int:
        return sum(k[0] for k in self.kinds.values())

    @property
    def misses(self) -> int:
        return sum(k[1] for k in self.kinds.values())

    @property
    def seconds(self) -> float:
        return sum(k[2] for k in self.kinds.values())

    def report(self) -> dict:
        out = {kind: {"hits": h, "misses": m, "seconds": round(sec, 3)} for kind, (h, m, sec) in self.kinds.items()}
        return {**out, "total_s": round(self.seconds, 3)}


STATS = JitStats()


def track_triton() -> bool:
    """Count Triton's compilations (and its disk-cache hits) in STATS, through its compilation
    listener (Triton 3.4 and later). Returns False where this Triton has none."""
    try:
        from triton import knobs
    except ImportError:
        return False
    if not hasattr(knobs.compilation, "listener"):
        return False
    previous = knobs.compilation.listener
    if getattr(previous, "tpfleet", False):
        return True

    def listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
        STATS.record("triton", cache_hit, times.total / 1e6)
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

    listener.tpfleet = True
    knobs.compilation.listener = listener
    return True


def find_nvcc() -> str | None:
    """CUDA_HOME (or CUDA_PATH) when set, and only there; otherwise PATH, then /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = Path(home) / "bin" / "nvcc"
        return str(nvcc) if nvcc.is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


@dataclass(frozen=True)
class BuildSpec:
    name: str
    source: Path
    arch: str  # e.g. "90" for sm_90
    flags: tuple[str, ...] = ("-O3",)

    def key(self, compiler_version: str) -> str:
        h = hashlib.sha256()
        parts = (self.source.read_bytes(), self.arch.encode(), compiler_version.encode(), " ".join(self.flags).encode())
        for part in parts:
            h.update(part)
            h.update(b"\0")
        return h.hexdigest()[:16]


def build_library(spec: BuildSpec) -> Path:
    """The path of the compiled shared library, building it first if no valid cache entry exists."""
    t0 = time.perf_counter()
    nvcc = find_nvcc()
    if nvcc is None:
        raise JitUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    key = spec.key(nvcc_version(nvcc))
    entry = env.cache_root() / "jit" / f"{spec.name}-sm{spec.arch}-{key}"
    lib = entry / f"{spec.name}.so"
    STATS.entries.append(str(entry))
    if lib.is_file():
        STATS.record("nvcc", True, time.perf_counter() - t0)
        return lib
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():  # another process (a peer rank) built it while we waited: still a cold start
            STATS.record("nvcc", False, time.perf_counter() - t0)
            return lib
        tmp = entry / f".{spec.name}.{os.getpid()}.so"
        cmd = [nvcc, *spec.flags, "-shared", "-Xcompiler", "-fPIC",
               f"-gencode=arch=compute_{spec.arch},code=sm_{spec.arch}", "-o", str(tmp), str(spec.source)]
        log.info("compiling %s for sm_%s (cache miss: %s)", spec.name, spec.arch, entry)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise JitUnavailable(f"nvcc failed for {spec.source.name}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
        STATS.record("nvcc", False, time.perf_counter() - t0)
        log.info("compiled %s in %.1fs", spec.name, time.perf_counter() - t0)
    return lib
