"""The checkpoint reader behind a GPU model's start (tpfleet.model.pinned_reader): every tensor exactly as
safetensors reads it, whatever the chunking, the alignment or the dtypes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpfleet.model.pinned_reader import pinned_tensors, plan_chunks, read_header


def _mapped(path):
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture
def checkpoint(tmp_path):
    """Two files of mixed dtypes and sizes: odd byte counts put later tensors off alignment."""
    g = torch.Generator().manual_seed(0)
    first = {"a.weight": torch.randn(33, 7, generator=g).bfloat16(), "b.bias": torch.randn(5, generator=g),
             "c.mask": torch.rand(13, generator=g) > 0.5, "d.ids": torch.randint(0, 1000, (9,), generator=g),
             "e.weight": torch.randn(300, 40, generator=g).half(), "f.scale": torch.randn(3, generator=g).double()}
    second = {"g.weight": torch.randn(2, 3, 4, generator=g).bfloat16(), "h.big": torch.randn(4000, generator=g)}
    paths = [tmp_path / "model-1.safetensors", tmp_path / "model-2.safetensors"]
    save_file(first, str(paths[0]))
    save_file(second, str(paths[1]))
    return paths


@pytest.mark.parametrize("buffer_bytes", [64, 1000, 20_000, 1 << 20])
def test_every_tensor_equals_safetensors_whatever_the_buffer(checkpoint, buffer_bytes):
    expected = {name: t for path in checkpoint for name, t in _mapped(path).items()}
    got = {}
    for name, tensor in pinned_tensors(checkpoint, buffer_bytes=buffer_bytes, pin=False):
        got[name] = tensor.clone()  # valid only until the next one is read
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_chunks_keep_file_order_alignment_and_their_limit(checkpoint):
    entries = read_header(checkpoint[0])
    assert [e.begin for e in entries] == sorted(e.begin for e in entries)
    limit = 1000
    chunks = plan_chunks(entries, limit)
    seen = []
    for chunk in chunks:
        if chunk.alone is not None:
            assert chunk.alone.end - chunk.alone.begin > limit
            seen.append(chunk.alone.name)
            continue
        assert chunk.end - chunk.begin <= limit
        for e in chunk.entries:
            assert (e.begin - chunk.begin) % e.dtype.itemsize == 0
        seen += [e.name for e in chunk.entries]
    assert seen == [e.name for e in entries]


def test_a_header_pointing_outside_the_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-8]))  # the tensor's last bytes cut off
    with pytest.raises(ValueError, match="outside the file"):
        read_header(path)


@pytest.mark.gpu
def test_pinned_buffers_reach_the_device_intact(checkpoint):
    expected = {name: t for path in checkpoint for name, t in _mapped(path).items()}
    for name, tensor in pinned_tensors(checkpoint, buffer_bytes=1000):
        assert tensor.is_pinned() or tensor.numel() * tensor.element_size() > 1000
        assert torch.equal(tensor.to("cuda").cpu(), expected[name]), name
