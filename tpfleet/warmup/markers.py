"""Done-markers: proof that a warm-up finished, valid only while what it built is still there.

A marker's key covers everything that changes what a warm-up builds: tpfleet's version, torch,
Triton and CUDA versions, the GPU architecture, the config's arguments and the kernel sources. Its
body fingerprints the cache entries the warm-up produced (path, size, content hash), so a marker
whose cache was wiped, pruned or overwritten is ignored and the warm-up runs again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tpfleet import __version__
from tpfleet.jit import cache_root, write_atomic

KERNEL_SOURCES = ("comm/csrc/custom_all_reduce.cu", "attention/triton_kernels.py")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources_hash(root: Path | None = None) -> str:
    root = root or Path(__file__).parents[1]
    h = hashlib.sha256()
    for rel in KERNEL_SOURCES:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def environment_versions() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    return {"tpfleet": __version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "arch": arch}


def marker_key(config_args: dict, versions: dict, sources: str) -> str:
    blob = json.dumps({"config": config_args, "versions": versions, "sources": sources}, sort_keys=True)
    return _sha(blob.encode())[:24]


def fingerprint(paths: list[Path]) -> dict[str, list]:
    """path -> [size, sha256] for every file under the given files or directories."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if f.name.startswith(".") or f.name.endswith(".lock"):
                continue
            out[str(f)] = [f.stat().st_size, _sha(f.read_bytes())]
    return out


def snapshot(paths: list[Path]) -> dict[str, int]:
    """path -> mtime_ns: cheap, to tell which entries a run created or rewrote."""
    out = {}
    for p in paths:
        if p.is_dir():
            for f in p.rglob("*"):
                if f.is_file() and not f.name.startswith(".") and not f.name.endswith(".lock"):
                    out[str(f)] = f.stat().st_mtime_ns
    return out


class MarkerStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or cache_root() / "warmup")

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
