"""Done-markers: proof that a warm-up finished, valid only while what it built is still there.

A marker's key covers everything that changes what a warm-up builds: tpfleet's version, torch,
Triton and CUDA versions, the GPU architecture, the config's arguments and the kernel sources. Its
body fingerprints the cache entries the warm-up produced (path, size, content hash), so a marker
whose cache was wiped, pruned or overwritten is ignored and the warm-up runs again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import runpy
import time
from pathlib import Path

from tpfleet import __version__, env
from tpfleet.devices import visible_gpus
from tpfleet.jit import write_atomic

# Every JIT cache entry is built from sources under these directories (Triton modules, CUDA files, the memory
# saver's allocator): a change to any of them must invalidate the markers. Compiled Python is not a source.
JIT_SOURCE_DIRS = ("kernels", "memory/csrc")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".h", ".cpp")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kernel_sources(root: Path | None = None) -> list[str]:
    """Every JIT source file, as a path relative to the package root `root`, in sorted order."""
    root = root or Path(__file__).parents[1]
    return sorted(str(path.relative_to(root)) for folder in JIT_SOURCE_DIRS for path in (root / folder).rglob("*")
                  if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts)


def sources_hash(root: Path | None = None) -> str:
    """A hash of every kernel source's relative path and content."""
    root = root or Path(__file__).parents[1]
    digest = hashlib.sha256()
    for relative in kernel_sources(root):
        digest.update(relative.encode())
        digest.update((root / relative).read_bytes())
    return digest.hexdigest()[:16]


def environment_versions() -> dict:
    """Read from package metadata and NVML, without importing torch or Triton or starting CUDA
    (seconds each): a warm-up whose markers are all valid should finish in about a second."""
    try:
        arch = next((f"sm_{g.arch}" for g in visible_gpus()), None)
    except Exception:  # noqa: BLE001 - no NVML, no driver: no GPU to compile for
        arch = None
    return {"tpfleet": __version__, "torch": _dist_version("torch"), "triton": _dist_version("triton"),
            "cuda": _torch_cuda_version(), "arch": arch}


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_cuda_version() -> str | None:
    """torch.version.cuda, read from torch/version.py (which imports nothing) rather than importing torch."""
    spec = importlib.util.find_spec("torch")
    version_py = Path(spec.origin).parent / "version.py" if spec and spec.origin else None
    return runpy.run_path(str(version_py)).get("cuda") if version_py and version_py.is_file() else None


def marker_key(config_args: dict, versions: dict, sources: str) -> str:
    blob = json.dumps({"config": config_args, "versions": versions, "sources": sources}, sort_keys=True)
    return _sha(blob.encode())[:24]


def _cache_files(paths: list[Path]):
    """Every cache file under the given files or directories, skipping temporaries and locks."""
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []:
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(".lock"):
                yield f


def fingerprint(paths: list[Path]) -> dict[str, list]:
    """path -> [size, sha256] for every file under the given files or directories."""
    return {str(f): [f.stat().st_size, _sha(f.read_bytes())] for f in _cache_files(paths)}


def snapshot(paths: list[Path]) -> dict[str, int]:
    """path -> mtime_ns: cheap, to tell which entries a run created or rewrote."""
    return {str(f): f.stat().st_mtime_ns for f in _cache_files(paths)}


class MarkerStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or env.cache_root() / "warmup")

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def write(self, key: str, config_args: dict, versions: dict, entries: list[Path]) -> Path:
        body = {"key": key, "config": config_args, "versions": versions, "created": time.time(),
                "fingerprint": fingerprint(entries)}
        write_atomic(self.path(key), json.dumps(body, indent=1))
        return self.path(key)

    def check(self, key: str) -> tuple[bool, str]:
        """(valid, why). Valid only if every fingerprinted entry is still there, byte for byte."""
        p = self.path(key)
        if not p.is_file():
            return False, "no marker"
        try:
            body = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return False, "unreadable marker"
        for f, (size, digest) in body.get("fingerprint", {}).items():
            path = Path(f)
            if not path.is_file():
                return False, f"cache entry gone: {f}"
            if path.stat().st_size != size or _sha(path.read_bytes()) != digest:
                return False, f"cache entry changed: {f}"
        return True, "valid"
