"""Warm-up on CPU with fake compile jobs: markers, keys, invalidation, timeouts, kills on a recorded failure."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import psutil

from tpfleet.phases import WARMUP_RESULT_PREFIX
from tpfleet.warmup.markers import MarkerStore, kernel_sources, marker_key, sources_hash
from tpfleet.warmup.runner import Job, run_job, run_warmup

VERSIONS = {"tpfleet": "0.1.0", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "arch": "sm_90"}


def fake_job(tmp_path, name, body, timeout=30.0, config=None):
    """A 'compile job': Python that writes into a cache dir and counts its runs."""
    config = config or {"name": name}
    code = f"""
import json, os, sys, time, pathlib
cache = pathlib.Path({str(tmp_path / 'cache')!r}); cache.mkdir(exist_ok=True)
runs = pathlib.Path({str(tmp_path / (name + '.runs'))!r})
runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
{body}
"""
    return Job(name, [sys.executable, "-c", code], marker_key(config, VERSIONS, "src"), config, VERSIONS, timeout)


def runs(tmp_path, name):
    p = tmp_path / f"{name}.runs"
    return int(p.read_text()) if p.exists() else 0


BUILD = f"""
(cache / 'kernel.so').write_bytes(b'compiled')
print('compiling...', flush=True)
print({WARMUP_RESULT_PREFIX!r} + ' ' + json.dumps({{'hits': 0, 'misses': 1}}), flush=True)
"""


def test_key_covers_versions_config_and_sources():
    base = marker_key({"tp": 2}, VERSIONS, "abc")
    assert base == marker_key({"tp": 2}, dict(VERSIONS), "abc")
    assert base != marker_key({"tp": 4}, VERSIONS, "abc")
    assert base != marker_key({"tp": 2}, {**VERSIONS, "torch": "2.12"}, "abc")
    assert base != marker_key({"tp": 2}, {**VERSIONS, "arch": "sm_100"}, "abc")
    assert base != marker_key({"tp": 2}, VERSIONS, "abd")
    assert len(sources_hash()) == 16


def test_every_triton_kernel_module_is_in_the_marker_key():
    """A kernel module left out of the kernel sources would let a stale marker skip a needed warm-up."""
    root = Path(__file__).parents[1] / "tpfleet"
    jit_modules = {str(f.relative_to(root)) for f in root.rglob("*.py") if "@triton.jit" in f.read_text()}
    assert jit_modules and jit_modules <= set(kernel_sources())


def test_every_file_under_kernels_is_in_the_marker_key(tmp_path):
    """The CUDA sources count as the Triton modules do (the memory saver's allocator too), and so does a kernel
    file added later."""
    assert {"kernels/csrc/custom_all_reduce.cu", "memory/csrc/vmm_allocator.cpp"} <= set(kernel_sources())
    (tmp_path / "kernels" / "csrc").mkdir(parents=True)
    (tmp_path / "kernels" / "gemv.py").write_text("v1")
    (tmp_path / "kernels" / "csrc" / "k.cu").write_text("v1")
    (tmp_path / "outside.py").write_text("not a kernel")
    assert kernel_sources(tmp_path) == ["kernels/csrc/k.cu", "kernels/gemv.py"]
    before = sources_hash(tmp_path)
    (tmp_path / "outside.py").write_text("changed")
    assert sources_hash(tmp_path) == before
    (tmp_path / "kernels" / "new.py").write_text("")
    assert sources_hash(tmp_path) != before


def test_second_run_is_a_no_op_and_a_wiped_cache_is_rebuilt(tmp_path):
    store = MarkerStore(tmp_path / "markers")
    job = fake_job(tmp_path, "tp2", BUILD)
    out = io.StringIO()
    [first] = run_warmup([job], [tmp_path / "cache"], store, out)
    assert first.status == "built" and first.misses == 1 and runs(tmp_path, "tp2") == 1
    [second] = run_warmup([job], [tmp_path / "cache"], store, out)
    assert second.status == "cached" and runs(tmp_path, "tp2") == 1  # the job did not run again
    (tmp_path / "cache" / "kernel.so").unlink()  # someone wiped the cache
    assert store.check(job.key) == (False, f"cache entry gone: {tmp_path / 'cache' / 'kernel.so'}")
    [third] = run_warmup([job], [tmp_path / "cache"], store, out)
    assert third.status == "built" and runs(tmp_path, "tp2") == 2
    (tmp_path / "cache" / "kernel.so").write_bytes(b"corrupt")  # same name, other bytes
    assert not store.check(job.key)[0]


def test_last_log_lines_are_printed_on_every_path(tmp_path):
    cases = {
        "ok": (BUILD + "print('marker-line-ok', flush=True)", "built"),
        "fails": ("print('marker-line-fails', flush=True); sys.exit(3)", "failed"),
        "hangs": ("print('marker-line-hangs', flush=True); time.sleep(600)", "timeout"),
    }
    for name, (body, status) in cases.items():
        out = io.StringIO()
        result, _ = run_job(fake_job(tmp_path, name, body, timeout=3), out=out)
        assert result.status == status
        summary = out.getvalue().split(f"[{name}] {status} in ")[1]  # what comes after the status line
        assert "last lines:" in summary and f"[{name}]   | marker-line-{name}" in summary


RECORD_FAILURE = """
from tpfleet import exits
exits.write(os.environ['TPFLEET_EXIT_RECORD'],
            exits.ExitRecord('rank', 1, os.getpid(), 'weights_loaded', 'RuntimeError', 'rank 1 ran out of memory'))
"""


def test_timeout_and_a_recorded_failure_kill_the_whole_process_group(tmp_path):
    grandchild = """
import subprocess
p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
(cache / 'grandchild.pid').write_text(str(p.pid))
"""
    for name, body, status in (
        ("hang", grandchild + "print('started', flush=True); time.sleep(600)", "timeout"),
        ("crash", grandchild + RECORD_FAILURE + "print('no exit', flush=True); time.sleep(600)", "crashed"),
    ):
        result, _ = run_job(fake_job(tmp_path, name, body, timeout=5), out=io.StringIO())
        assert result.status == status, result
        pid = int((tmp_path / "cache" / "grandchild.pid").read_text())
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert gone, f"{name}: grandchild {pid} survived"
        if name == "crash":  # the record, not the output, says why
            assert result.seconds < 5 and "rank 1" in result.detail
            assert "in phase weights_loaded: RuntimeError: rank 1 ran out of memory" in result.detail


def test_a_recorded_failure_fails_a_job_that_exits_zero(tmp_path):
    result, _ = run_job(fake_job(tmp_path, "quiet", RECORD_FAILURE + BUILD), out=io.StringIO())
    assert result.status == "failed" and "RuntimeError: rank 1 ran out of memory" in result.detail


def test_failed_jobs_leave_no_marker(tmp_path):
    store = MarkerStore(tmp_path / "markers")
    job = fake_job(tmp_path, "bad", "sys.exit(1)")
    [r] = run_warmup([job], [tmp_path / "cache"], store, io.StringIO())
    assert r.status == "failed" and not store.path(job.key).exists()


def test_warmup_cli_on_the_tiny_model_is_a_no_op_the_second_time(tiny_model, tmp_path):
    env = {**__import__("os").environ, "TPFLEET_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "tpfleet.cli", "warmup", "--model", str(tiny_model), "--tp", "1,2", "--device", "cpu",
           "--kv-cache-tokens", "4096"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:]
    assert statuses(first.stdout) == {"tp1-auto-cpu": "built", "tp2-auto-cpu": "built"}
    assert "jit_caches" in first.stdout  # the engine reports its JIT cache use at start-up
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "warming up" not in second.stdout
    assert statuses(second.stdout) == {"tp1-auto-cpu": "cached", "tp2-auto-cpu": "cached"}


def statuses(stdout: str) -> dict[str, str]:
    """The closing table's config -> status."""
    table = stdout.split("config ")[-1].splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in table if line.strip()}
