"""Counting the host's reads of tensor values: each one is a host-device synchronisation on a GPU
(the host waits for the device's queue to drain), so the training loop allows one per step.

On CUDA, :func:`count_host_syncs` uses PyTorch's own detector (``torch.cuda.set_sync_debug_mode``,
which warns at every synchronising call). On CPU there is no device to wait for, so the same
question is answered by what would synchronise on a GPU: Python-level reads of a tensor's values
(``item``, ``tolist``, ``bool``/``float``/``int`` of a tensor, ``numpy``, ``cpu``), counted with a
:class:`~torch.overrides.TorchFunctionMode`. Reads made inside C++ (none in a training step) are not
seen; copies of CPU tensors are counted too (on a GPU they would be reads of device tensors).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

#: Tensor methods that hand a tensor's values to the host.
HOST_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                        "numpy", "cpu"})


class HostSyncCounter:
    """How many host reads happened, and where (the method names, in order)."""

    def __init__(self):
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)


class _CountReads(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counter.calls.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str) -> Iterator[HostSyncCounter]:
    """Counts host-device synchronisations inside the block (see the module docstring)."""
    counter = HostSyncCounter()
    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        counter.calls.extend(str(w.message).splitlines()[0] for w in caught
                             if "synchroniz" in str(w.message))
    else:
        with _CountReads(counter):
            yield counter


__all__ = ["HOST_READS", "HostSyncCounter", "count_host_syncs"]
