"""Exact, machine-independent counts of what an op costs on the host: ATen ops, Triton launches,
and host syncs, through a ``TorchDispatchMode``.

- :class:`NoHostSync` fails on every ATen op whose output size depends on data or that reads a
  value back to the host (``nonzero``, ``masked_select``, boolean indexing, ``unique``,
  ``item``/``_local_scalar_dense``, ``repeat_interleave`` without ``output_size``,
  ``torchvision::nms``): on the CPU it proves an op would not sync a GPU.
- :class:`DispatchCounter` counts ATen ops, sync-causing ops and Triton launches (benchmarks).
  Under the Triton interpreter, the ATen ops that move a kernel's arguments during a launch are
  left out: a GPU launch makes none, so the counts are those of the GPU path on every machine.
- :class:`HostCopyCounter` counts what a CUDA-graph capture cannot record: host data copied to
  a device (a tensor built from Python values, a copy from a CPU tensor to another device) and
  the kernel tables copied by ``_launch.device_table``; on the CPU it proves a warmed-up op
  would make no host-to-device copy on a GPU.
- :func:`measure_costs` gives a block's :class:`Costs`: the same counts plus the ATen ops that
  launch a device kernel, with the Triton interpreter's own argument copies counted apart (a GPU
  launch makes none), so that counts taken on the CPU under the interpreter are the GPU's.

``tritondet::`` custom ops are entered, not treated as opaque, so the ops inside their
implementations are seen too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import _launch

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
        if _launch.launching():  # the Triton interpreter moving kernel arguments: a GPU makes no such op
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


# Ops that copy host data to a device: a tensor built from Python values (``torch.tensor``,
# ``new_tensor``, ``as_tensor``: built on the host, then copied) and copies from a CPU tensor.
_HOST_DATA_OPS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}


def copies_host_data(func, args, kwargs) -> bool:
    """Whether this ATen call copies host data to a device (on the CPU: would on a GPU)."""
    if func in _HOST_DATA_OPS:
        return True
    if func not in _COPY_OPS:
        return False
    if func is _aten.copy_.default:  # copy_(destination, source)
        return args[1].device.type == "cpu" and args[0].device.type != "cpu"
    device = kwargs.get("device")
    return args[0].device.type == "cpu" and device is not None and torch.device(device).type != "cpu"


class HostCopyCounter(DispatchCounter):
    """Counts, inside the ``with`` block, the ATen ops that copy host data to a device
    (``copies``, names in ``copy_ops``; see :func:`copies_host_data`) and the kernel tables
    ``_launch.device_table`` copied (``table_misses``): a CUDA-graph capture records neither."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0
        self.copy_ops: list[str] = []
        self._misses_at_start = 0
        self.table_misses = 0

    def __enter__(self):
        if self._depth == 0:
            self._misses_at_start = _launch.table_misses()
        return super().__enter__()

    def __exit__(self, *exc):
        if self._depth == 1:
            self.table_misses = _launch.table_misses() - self._misses_at_start
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _launch.launching() and _custom_op_body(func) is None and copies_host_data(func, args, kwargs):
            self.copies += 1
            self.copy_ops.append(str(func))
        return super().__torch_dispatch__(func, types, args, kwargs)


class HostSyncError(AssertionError):
    pass


class NoHostSync(DispatchCounter):
    """Raises :class:`HostSyncError` at the first sync-causing ATen op inside the block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _custom_op_body(func) is None and causes_host_sync(func, args, kwargs):
            raise HostSyncError(f"{func} syncs with the host or sizes its output from data")
        return super().__torch_dispatch__(func, types, args, kwargs)


# Ops that allocate or only change metadata: no device kernel. Views are recognised by schema.
_NO_KERNEL_OPS = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.lift_fresh.default,
    _aten.set_.source_Storage,
    _aten.set_.source_Storage_storage_offset,
    _aten.resize_.default,
    _aten.sym_size.int,
    _aten.sym_stride.int,
    _aten.sym_numel.default,
}


def launches_kernel(func) -> bool:
    """Whether this ATen op launches (at least) one device kernel: all but views and allocations."""
    return not func.is_view and func not in _NO_KERNEL_OPS


@dataclasses.dataclass
class Costs:
    """What a block of code costs on the host, counted exactly (the same on every machine).

    Attributes:
        aten_ops: every ATen op dispatched, including the Triton interpreter's argument copies.
        interpreter_ops: of those, the ATen ops the Triton interpreter made to move kernel
            arguments (0 on a GPU or without the interpreter).
        kernel_ops: ATen ops, interpreter copies left out, that launch a device kernel (all but
            views and allocations).
        launches: Triton kernel launches.
        syncs: sync-causing ATen ops (:func:`causes_host_sync`); ``sync_ops`` names them in order.
    """

    aten_ops: int = 0
    interpreter_ops: int = 0
    kernel_ops: int = 0
    launches: int = 0
    syncs: int = 0
    sync_ops: list[str] = dataclasses.field(default_factory=list)

    @property
    def net_aten_ops(self) -> int:
        """ATen ops net of the Triton interpreter's argument copies: what a GPU would dispatch."""
        return self.aten_ops - self.interpreter_ops

    @property
    def device_launches(self) -> int:
        """Device kernels launched: Triton launches plus the ATen ops that launch a kernel (the
        benchmark table's ``launches``)."""
        return self.launches + self.kernel_ops


class _CostCounter(DispatchCounter):
    """A :class:`DispatchCounter` that also counts kernel-launching ops and interpreter copies."""

    def __init__(self) -> None:
        super().__init__()
        self.interpreter_ops = 0
        self.kernel_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _custom_op_body(func) is None:
            if _launch.launching():  # the Triton interpreter moving a kernel's arguments
                self.interpreter_ops += 1
            elif launches_kernel(func):
                self.kernel_ops += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def measure_costs() -> Iterator[Costs]:
    """``with measure_costs() as costs: ...``: ``costs`` (a :class:`Costs`) is filled in when the
    block ends. Launches come from :func:`tritondet.kernels._launch.count_launches` (every launch
    goes through ``launch()``)."""
    costs = Costs()
    with _launch.count_launches() as launches, _CostCounter() as counter:
        yield costs
    costs.aten_ops, costs.interpreter_ops, costs.kernel_ops = (
        counter.aten_ops + counter.interpreter_ops,  # DispatchCounter leaves the copies out
        counter.interpreter_ops,
        counter.kernel_ops,
    )
    costs.launches, costs.syncs, costs.sync_ops = launches.launches, counter.syncs, list(counter.sync_ops)
