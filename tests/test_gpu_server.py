"""The server on CUDA in bf16, as users run it on a GPU (skipped without one)."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from conftest import NUM_GPUS

from tpfleet.demo import process_family, start_server, wait_gone

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs"))])
def test_cuda_bf16_server_generates_streams_and_stops_clean(tiny_model, tp):
    proc, url = start_server(tiny_model, tp_size=tp, device="cuda",
                             extra_args=["--dtype", "bfloat16", "--kv-cache-tokens", "16384"])
    pids = process_family(proc.pid)
    try:
        body = {"text": ["Once upon a time", "The river flows"],
                "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
        outs = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [16, 16]
        with httpx.stream("POST", f"{url}/generate", json={**body, "text": body["text"][0], "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["output_ids"] == outs[0]["output_ids"]
        assert httpx.get(f"{url}/health_generate", timeout=30).status_code == 200
        assert httpx.post(f"{url}/generate", json={"input_ids": [10**6]}).status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert wait_gone(pids, timeout=10) == []
