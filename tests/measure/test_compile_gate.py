"""The ahead-of-time compile gate: every declared kernel specialization compiles for sm_80 and
sm_90 with zero register spills, and the report reads registers, shared memory and SASS size."""

import pytest

from tritondet.kernels import FAMILIES
from tritondet.kernels._aot import ARCHS
from tritondet.measure import compile_report


@pytest.fixture(scope="module")
def results():
    return compile_report.compile_all()


def _defines_kernels(module) -> bool:
    """Whether ``module`` defines ``@triton.jit`` functions (under the interpreter too: both kinds keep ``fn``)."""
    return any(
        hasattr(value, "arg_names") and getattr(getattr(value, "fn", None), "__module__", None) == module.__name__
        for value in vars(module).values()
    )


def test_every_family_declares_specializations():
    for family, module in FAMILIES.items():
        if _defines_kernels(module):
            assert module.AOT_SPECS, f"{family} declares no AOT_SPECS"
        else:
            assert module.AOT_SPECS == [], f"{family} has no kernel but declares AOT_SPECS"
        assert module.PUBLIC_OPS, f"{family} declares no PUBLIC_OPS"


def test_every_specialization_compiles_without_spills(results):
    assert len(results) == len(compile_report.spec_ids()) * len(ARCHS)
    failures = [f"{family}: {r.kernel} sm_{r.arch}: {r.error or r.spill_bytes}" for family, r in results if not r.ok]
    assert not failures, "\n".join(failures)


def test_report_reads_real_resource_usage(results):
    for _, result in results:
        assert result.registers and result.registers > 0
        assert result.sass_instructions and result.sass_instructions > 0
        assert result.shared_bytes is not None


def test_table_lists_every_kernel_for_both_archs(results):
    table = compile_report.format_table(results)
    for _, result in results:
        assert result.kernel in table
    assert "sm_80" in table and "sm_90" in table
