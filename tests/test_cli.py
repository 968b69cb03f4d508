"""The command line as users run it: make-model, the demo, and process lifecycle of `serve`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors import safe_open

from tpfleet.demo import process_family, start_server, wait_gone
from tpfleet.model.make_model import make_model


def test_make_model_writes_a_sharded_hf_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tpfleet.cli", "make-model", "--preset", "tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    assert str(tmp_path) in out.stdout
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        assert (tmp_path / name).is_file(), name
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] % 2 == 1
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = set(index.values())
    assert len(files) > 1
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as st:
            assert {k for k, v in index.items() if v == f} == set(st.keys())


def test_presets_are_deterministic_per_seed(tmp_path):
    a, b, c = (make_model("tiny", tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    def embedding(d):
        return safe_open(str(next(d.glob("model-00001-*"))), "pt").get_tensor("model.embed_tokens.weight")

    assert embedding(a).equal(embedding(b)) and not embedding(a).equal(embedding(c))


def test_demo_runs_and_leaves_no_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tpfleet.cli", "demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 left" in r.stdout and "prefix cache" in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_every_rank_on_signal(tiny_model, sig):
    proc, url = start_server(tiny_model, tp=2)
    pids = process_family(proc.pid)
    assert len(pids) >= 2
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert wait_gone(pids, timeout=5) == []


def test_a_killed_rank_takes_the_engine_down_promptly(tiny_model):
    proc, url = start_server(tiny_model, tp=2)
    pids = process_family(proc.pid)
    worker = next(c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
                  and "resource_tracker" not in " ".join(c.cmdline()))
    t = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=10)
    assert code != 0 and time.monotonic() - t < 5
    assert wait_gone(pids, timeout=5) == []
