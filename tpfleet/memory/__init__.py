"""GPU memory that an engine gives back between RL steps and takes again at the same addresses."""

from tpfleet.memory.native import ipc_exportable
from tpfleet.memory.saver import MemorySaver, NullSaver, Saver, make_saver
from tpfleet.memory.tags import CUDA_GRAPH, KV_CACHE, TAGS, WEIGHTS, MemorySaverError

__all__ = ["CUDA_GRAPH", "KV_CACHE", "TAGS", "WEIGHTS", "MemorySaver", "MemorySaverError", "NullSaver", "Saver",
           "ipc_exportable", "make_saver"]
