"""Exact, machine-independent counts of what an op costs on the host: ATen ops, Triton launches,
and host syncs, through a ``TorchDispatchMode``.

- :class:`NoHostSync` fails on every ATen op whose output size depends on data or that reads a
  value back to the host (``nonzero``, ``masked_select``, boolean indexing, ``unique``,
  ``item``/``_local_scalar_dense``, ``repeat_interleave`` without ``output_size``,
  ``torchvision::nms``): on the CPU it proves an op would not sync a GPU.
- :class:`DispatchCounter` counts ATen ops, sync-causing ops and Triton launches (benchmarks).
  Under the Triton interpreter, the ATen ops that move a kernel's arguments during a launch are
  left out: a GPU launch makes none, so the counts are those of the GPU path on every machine.

``tritondet::`` custom ops are entered, not treated as opaque, so the ops inside their
implementations are seen too.
"""

from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels import _launch

_aten = torch.ops.aten
# Ops whose output size depends on tensor values, or that copy a value to the host.
_SYNCING_OPS = {
    _aten.nonzero.default,
    _aten.nonzero_static.default,
    _aten.nonzero_numpy.default,
    _aten.argwhere.default,
    _aten.masked_select.default,
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
}
# nonzero_static has a fixed output size and is sync-free on CUDA; it stays allowed.
_SYNCING_OPS.discard(_aten.nonzero_static.default)
_SYNCING_OPS_BY_NAME = {"torchvision::nms"}


def causes_host_sync(func, args, kwargs) -> bool:
    """Whether this ATen call makes the host wait for the device (or sizes its output from data)."""
    if func in _SYNCING_OPS or func._schema.name in _SYNCING_OPS_BY_NAME:
        return True
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices or ()
        )
    return False


def _custom_op_body(func):
    """The Python implementation of a ``tritondet::`` custom op, or None for any other op."""
    name = func._schema.name
    if not name.startswith("tritondet::"):
        return None
    opdef = OPDEFS.get(name)
    return None if opdef is None else opdef._init_fn


class DispatchCounter(TorchDispatchMode):
    """Counts ATen ops (``aten_ops``), sync-causing ops (``syncs``, names in ``sync_ops``) and
    Triton kernel launches (``launches``) made inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.aten_ops = 0
        self.syncs = 0
        self.sync_ops: list[str] = []
        self._launch_count = None
        self._depth = 0  # the mode re-enters itself around custom-op bodies: count from the outermost

    def __enter__(self):
        if self._depth == 0:
            self._launch_count = _launch.LaunchCount()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._launch_count.stop = _launch.launch_total()
        return super().__exit__(*exc)

    @property
    def launches(self) -> int:
        return self._launch_count.launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _launch.launching():  # the Triton interpreter moving kernel arguments: not the op's work
            return func(*args, **kwargs)
        body = _custom_op_body(func)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        self.aten_ops += 1
        if causes_host_sync(func, args, kwargs):
            self.syncs += 1
            self.sync_ops.append(str(func))
        return func(*args, **kwargs)


class HostSyncError(AssertionError):
    pass


class NoHostSync(DispatchCounter):
    """Raises :class:`HostSyncError` at the first sync-causing ATen op inside the block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _custom_op_body(func) is None and causes_host_sync(func, args, kwargs):
            raise HostSyncError(f"{func} syncs with the host or sizes its output from data")
        return super().__torch_dispatch__(func, types, args, kwargs)
