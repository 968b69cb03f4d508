"""Programmatic dependent launch (PDL): a kernel starts while the kernel before it drains.

A batch-1 decode step is a chain of some 230 kernels, each too short to hide its own start. Normally
a kernel is launched only when the last block of the one before it has exited, and its first weight
bytes arrive a DRAM latency after that: the memory stream stops at every kernel boundary. With PDL
(Hopper and later) a kernel launched with `launch_pdl` may start once every block of the kernel
before it has executed `griddepcontrol.launch_dependents`; it then reads what does not depend on
that kernel (its weights) and blocks in `griddepcontrol.wait` until that kernel has finished and its
writes are visible.

The rule every PDL kernel in tpfleet keeps: before its wait it writes nothing and reads nothing the
kernel before it writes (weights; for q/k norm, the positions' RoPE rows and the KV slots; for decode
attention, the keys and values of earlier tokens; for the MoE down GEMV, the routing and the chosen
experts' weights, the router's kernel having finished before gate_up's wait returned); right after the
wait it lets its own dependents launch (`enter`). So at most two kernels overlap, and a kernel's wait,
which follows its predecessor's completion, also covers every kernel before that one. Kernels launched without PDL
(cuBLAS, torch) serialise as usual.

TPFLEET_PDL=0 (tpfleet.env.PDL) turns it off, for A/B measurements or as an escape hatch.
"""

from __future__ import annotations

import functools

import torch

from tpfleet import env

try:  # the kernels' half; CPU-only installs may lack Triton, and the custom all-reduce needs only `enabled`
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    triton = None


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device, rows: int) -> bool:
    """Whether a kernel over `rows` rows (tokens, sequences) on `device` is launched with PDL: on Hopper
    or later, for one row, unless turned off. Batch-1 decode is a chain of kernels too short to hide
    their own starts, and there PDL cut the step time. Larger batches launch as usual: PDL there has
    not been shown to help (an A/B that seemed to show an offline loss was confounded by run order,
    docs/benchmarks.md)."""
    if rows != 1 or device.type != "cuda" or not env.PDL():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


if triton is not None:
    # Triton's interpreter has no grid dependency control, and runs one kernel at a time anyway: there
    # a PDL kernel's code runs whole, with nothing to wait for (the CPU tests use this). A constexpr
    # global, as Triton requires, so it is fixed when this module is imported, as Triton's own
    # interpreter switch is.
    INTERPRETED = tl.constexpr(env.triton_interpreted())

    @triton.jit
    def enter(PDL: tl.constexpr):
        """Wait for the kernel before, then let the kernel after start (see the module docstring)."""
        if PDL and not INTERPRETED:
            gdc_wait()
            gdc_launch_dependents()
