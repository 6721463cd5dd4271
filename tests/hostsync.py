"""A host-sync detector that works on CPU: `with no_host_sync(): step()` raises HostSync at the first operation
that, on a GPU, would make the host wait for the device.

Two nets, because a CPU tensor's .tolist() reads memory without going through the dispatcher:
  - a TorchDispatchMode that refuses the aten ops that read a device value back (_local_scalar_dense: .item(),
    int(t), float(t), bool(t), `if t:`) or whose output shape depends on the data (nonzero, masked_select, unique,
    bincount, repeat_interleave without output_size, boolean-mask indexing through nonzero);
  - Tensor.tolist / .numpy / .cpu / .item patched to raise (C++ paths the dispatcher does not see on CPU).
tests/test_ep_padded.py shows it catches `ep` (its split sizes go through .tolist()) before trusting it on
`ep-padded`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "bincount", "item"}


class HostSync(AssertionError):
    pass


class _Refuse(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            raise HostSync(f"host sync: aten.{name}")
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) >= 1 \
                and isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
            raise HostSync("host sync: aten.repeat_interleave without output_size (its length is read back)")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync():
    patched = {}

    def refuse(name):
        def f(self, *a, **k):
            raise HostSync(f"host sync: Tensor.{name}()")
        return f

    for name in ("tolist", "numpy", "cpu", "item"):
        patched[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _Refuse():
            yield
    finally:
        for name, fn in patched.items():
            setattr(torch.Tensor, name, fn)
