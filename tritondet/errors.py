"""The exceptions tritondet raises for bad arguments, one class per builtin kind.

Code written for torchvision catches what torchvision raises: ``RuntimeError`` from its C++ checks
(``TORCH_CHECK``: shapes, dtypes, argument types of the op schema), ``AssertionError`` from its
Python box-shape checks (``torch._assert``). Each class here derives from the builtin kind its
name says and from what torchvision raises in the same situation, so ``except ValueError``,
``except TypeError`` and ``except RuntimeError`` (or ``AssertionError``) all catch it. Every
message names the argument.
"""

from __future__ import annotations


class TritondetError(Exception):
    """Base of every argument error tritondet raises."""


class ArgumentValueError(TritondetError, ValueError, RuntimeError):
    """An argument has a wrong value or shape (torchvision: ``RuntimeError``)."""


class ArgumentTypeError(TritondetError, TypeError, RuntimeError):
    """An argument has a wrong Python type or tensor dtype (torchvision: ``RuntimeError`` from its
    op schema or dtype checks)."""


class BoxesShapeError(ArgumentValueError, AssertionError):
    """RoI boxes that are neither ``Tensor[K, 5]`` nor a list of ``Tensor[L, 4]`` (torchvision:
    ``AssertionError``)."""


__all__ = ["ArgumentTypeError", "ArgumentValueError", "BoxesShapeError", "TritondetError"]
