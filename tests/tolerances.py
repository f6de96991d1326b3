"""The one tolerance table every test uses: (atol, rtol) by the dtype of the op's inputs.

fp16/bf16 rows: our ops compute in fp32 from upcast inputs, torchvision rounds some intermediates
in half precision; the rows bound that rounding (2^-11 resp. 2^-8 relative, a few times over).
"""

import torch

TOLERANCES = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.int64: (1e-5, 1e-5),
    torch.int32: (1e-5, 1e-5),
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype, **kwargs) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``input_dtype``; NaN equal NaN."""
    atol, rtol = TOLERANCES[input_dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True, **kwargs)


# Float64 gradients summed with atomics differ between two backward passes only by the order of
# the additions: a few ulps of the gradients' size (of order 1 in the tests); gradcheck's
# reentrancy check takes this as its nondet_tol.
ATOMIC_NONDET_TOL = 1e-12
