"""Programmatic dependent launch (PDL) for the kernels of the decode step.

A batch-1 decode step is ~600 short kernels in a row; between two of them the GPU drains one grid and only
then launches the next (~1-3 us each: launch, ramp-up, first-byte latency). With PDL (Hopper, ``launch_pdl``)
the next grid is launched while this one runs and waits in ``griddepcontrol.wait`` (:func:`gdc_wait`) until
this grid has completed and its writes are visible. The contract every PDL-launched kernel here follows:

- ``gdc_wait()`` unconditionally, in every program, before it reads OR writes any activation, cache, counter
  or scratch buffer (writes too: the previous kernel may still read a buffer the allocator handed out again).
  Only constant weights may be read before it. Because every kernel waits for the one before it, and that one
  finished only after its own wait, a kernel that passed its wait sees the writes of every earlier kernel.
- ``gdc_launch_dependents()`` right after the wait: the next grid starts arriving during this one's work,
  one kernel ahead (never a cascade of waiting grids).

Kernels of other libraries (cuBLAS, PyTorch) never trigger early: the chain simply waits for them.

``SCOUT_MM_PDL=auto|on|off``: ``auto`` (default) uses PDL on CUDA devices of compute capability 9.0 or newer
and never under ``TRITON_INTERPRET=1``; ``on`` as auto but raises where PDL is impossible; ``off`` never.
"""

from __future__ import annotations

import functools
import os

import torch

_MODES = ("auto", "on", "off")


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL (see the module docstring)."""
    mode = os.environ.get("SCOUT_MM_PDL", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"SCOUT_MM_PDL={mode!r}; expected one of {_MODES}")
    if mode == "off":
        return False
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    possible = device.type == "cuda" and not interpreting and _capable(device.index or 0)
    if mode == "on" and not possible:
        raise ValueError(
            f"SCOUT_MM_PDL=on needs a CUDA device of compute capability >= 9.0 and no TRITON_INTERPRET; got "
            f"{device}{' under the interpreter' if interpreting else ''}"
        )
    return possible


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch of a kernel with a ``PDL: tl.constexpr`` parameter."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


# Imported here, not at the top: the switch above serves callers that never compile a kernel.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402


@triton.jit
def pdl_wait_and_trigger(PDL: tl.constexpr):
    """The PDL prologue of a kernel (module docstring): wait for the previous grid, then let the next launch.
    Call it before any access to non-constant memory, outside any branch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


_COUNTERS: dict = {}
_RETIRED: list = []


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for "the last program to arrive runs the epilogue" kernels, one buffer per
    (device, stream): kernels of one stream run one after another (with PDL: each touches them only after its
    wait), and each leaves its counters at zero. A buffer that grows keeps its old storage alive, because a
    captured CUDA graph may still point at it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf
