"""Moving weights from a trainer into a running engine.

GPU tensors travel as CUDA IPC handles (no copy until the engine's ranks load their shards). A
handle names a device by the sender's index, which means nothing in the receiver (its
CUDA_VISIBLE_DEVICES differs), so the payload carries the device's UUID and the receiver maps it to
its own local index before opening the handle. CPU tensors travel by value.
"""

from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor  # importing registers the CUDA IPC reductions

from tpfleet.devices import local_index_of, local_uuid

_STORAGE_DEVICE_ARG = 6  # position of storage_device in rebuild_cuda_tensor's arguments


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(f"all tensors of one payload must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(named)
        payload = {"format": "cuda_ipc", "device_uuid": local_uuid(device.index), "data": buf.getvalue()}
    else:
        buf = io.BytesIO()
        torch.save(named, buf)
        payload = {"format": "bytes", "data": buf.getvalue()}
    return base64.b64encode(pickle.dumps(payload)).decode()


class _LocalDeviceUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, local_index: int):
        super().__init__(io.BytesIO(data))
        self.local_index = local_index

    def find_class(self, module, name):
        obj = super().find_class(module, name)
        if obj is rebuild_cuda_tensor:
            def rebuild(*args):
                args = list(args)
                args[_STORAGE_DEVICE_ARG] = self.local_index
                return rebuild_cuda_tensor(*args)

            return rebuild
        return obj


def deserialize_named_tensors(text: str) -> list[tuple[str, torch.Tensor]]:
    payload = pickle.loads(base64.b64decode(text))
    if payload["format"] == "cuda_ipc":
        return _LocalDeviceUnpickler(payload["data"], local_index_of(payload["device_uuid"])).load()
    return torch.load(io.BytesIO(payload["data"]), weights_only=True)
