"""Shared fixtures: random checkpoints built once per session, devices, and a served engine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tpfleet.model.make_model import make_model

HAS_CUDA = torch.cuda.is_available()
NUM_GPUS = torch.cuda.device_count() if HAS_CUDA else 0


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def run_in_triton_interpreter(module: str) -> str:
    """Run tests/<module>.py's `interpreter_main()` in a child with TRITON_INTERPRET=1, which Triton
    reads when kernels are defined: Triton kernels executed on the CPU. Returns the child's stdout."""
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import {module}; {module}.interpreter_main()"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@contextmanager
def pdl_forced() -> Iterator[None]:
    """For interpreter runs: kernels take their batch-1 PDL path (tpfleet.kernels.pdl), whose code the
    interpreter runs whole (the weights' first tile before the wait)."""
    from tpfleet.kernels import pdl

    enabled = pdl.enabled
    pdl.enabled = lambda device, rows: rows == 1
    try:
        yield
    finally:
        pdl.enabled = enabled


# cpu runs float32 (token-exact against transformers); cuda runs where a GPU exists.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def server(tiny_model):
    """One TP=2 CPU server for the HTTP tests, in its own process, as users run it."""
    from servers import serving

    with serving(tiny_model, 2, "--kv-cache-tokens", "8192") as url:
        yield url
