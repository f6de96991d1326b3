"""Argument checks shared by the op families of :mod:`tritondet.ops`: clear errors that name the argument."""

from __future__ import annotations

import numbers

import torch

from ..errors import ArgumentTypeError, ArgumentValueError


def check_tensor(name: str, value, *, min_dim: int = 0, last_dim: int | None = None) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a real-valued tensor of the given rank."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise ArgumentTypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ArgumentValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if last_dim is not None and (value.dim() == 0 or value.shape[-1] != last_dim):
        raise ArgumentValueError(f"{name} must have shape [..., {last_dim}], got shape {tuple(value.shape)}")
    return value


def check_real(name: str, value) -> float:
    """``value`` as a float; ``ArgumentTypeError`` unless it is a real number (a Python or NumPy
    int or float; a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """``value`` unchanged; ``ArgumentTypeError`` unless it is an int (a bool or a float is not),
    ``ArgumentValueError`` when it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def traced_call(function, *args):
    """Under ``torch.fx`` symbolic tracing (an argument, or an element of a list, tuple or dict
    argument, is a ``torch.fx.Proxy``): the proxy of one call to ``function``, which stays a leaf
    of the graph as torchvision's ``torch.fx.wrap``-ed ops do; otherwise None."""
    for value in args:
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in values:
            if isinstance(item, torch.fx.Proxy):
                return item.tracer.create_proxy("call_function", function, args, {})
    return None


def check_floating(name: str, value: torch.Tensor) -> torch.Tensor:
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of ``tensors``; ``ValueError`` naming both arguments when they differ."""
    names = list(tensors)
    first = names[0]
    for name in names[1:]:
        if tensors[name].device != tensors[first].device:
            raise ArgumentValueError(
                f"{first} and {name} must be on the same device, got {tensors[first].device} and {tensors[name].device}"
            )
    return tensors[first].device


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ArgumentValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_counts(name: str, counts: torch.Tensor, upper: int, lower: int = 0) -> None:
    """Every value of the integer tensor ``counts`` lies in ``[lower, upper]``, checked without a host sync.

    ``torch._assert_async`` becomes a device-side assert on CUDA, so the check never waits for the
    GPU, and raises at once on the CPU (re-raised here as an ``ArgumentValueError`` naming the
    argument). On CPU tensors outside compilation the values' range is read instead: one op in
    place of four and the assert, the same error.
    """
    if counts.is_floating_point() or counts.dtype == torch.bool or counts.is_complex():
        raise ArgumentTypeError(f"{name} must be an integer tensor, got dtype {counts.dtype}")
    message = f"{name} values must lie in [{lower}, {upper}]"
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        if counts.numel() > 0:
            smallest, largest = torch.aminmax(counts)
            if not (lower <= smallest.tolist() and largest.tolist() <= upper):
                raise ArgumentValueError(message)
        return
    try:
        torch._assert_async(((counts >= lower) & (counts <= upper)).all(), message)
    except RuntimeError as error:
        raise ArgumentValueError(message) from error


VALIDATE_VARIABLE = "TRITONDET_VALIDATE"


def validation_enabled(device: torch.device) -> bool:
    """Whether data-dependent checks (which read values back to the host) run: with
    ``TRITONDET_VALIDATE=1`` always, with ``0`` never, unset on CPU tensors only; never while
    compiling."""
    import os

    if torch.compiler.is_compiling():
        return False
    choice = os.environ.get(VALIDATE_VARIABLE, "")
    return choice == "1" or (choice != "0" and device.type == "cpu")


def check_roi_batch_indices(name: str, rois: torch.Tensor, num_images: int) -> None:
    """``ValueError`` naming the first row of ``rois`` ``[K, 5]`` whose batch index (column 0) is
    not an integer in ``[0, num_images)``."""
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < num_images) & (index == index.floor()))
    if bool(bad.any()):
        first = int(bad.int().argmax())
        raise ArgumentValueError(
            f"{name}[{first}] has batch index {index[first].item()}, which is not an integer in [0, {num_images})"
        )


def box_coder_weights(weights) -> list[float]:
    """Four Python floats from a sequence or a 4-element tensor (a CUDA tensor is read back once)."""
    if isinstance(weights, torch.Tensor):
        if weights.numel() != 4:
            raise ArgumentValueError(f"weights must have 4 elements (wx, wy, ww, wh), got shape {tuple(weights.shape)}")
        return [float(w) for w in weights.detach().reshape(4).tolist()]
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as error:
        raise ArgumentTypeError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}") from error
    if len(values) != 4:
        raise ArgumentValueError(f"weights must have 4 elements (wx, wy, ww, wh), got {len(values)}")
    return values
