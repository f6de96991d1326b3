"""The ahead-of-time compile gate: every declared kernel specialization compiles for sm_80 and
sm_90 with zero register spills, the report reads registers, shared memory and SASS size, and the
PTX of every exact kernel has no instruction that rounds otherwise than PyTorch."""

import pytest
import torch

from tritondet.kernels import FAMILIES, box_iou
from tritondet.kernels._aot import ARCHS, INEXACT_OPCODES, inexact_opcodes, specialization_key
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
        compiled = {spec.kernel for spec in module.AOT_SPECS}
        assert compiled >= module.EXACT_KERNELS, f"{family} declares EXACT_KERNELS it does not compile"


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
    assert "PTX lint" in table and "exact" in table


def test_inexact_opcodes_reads_ptx_instructions():
    ptx = """
        div.full.f32 %f3, %f1, %f2;
        div.rn.f32 %f4, %f1, %f2;
        rcp.approx.ftz.f32 %f5, %f2;
        sqrt.rn.f32 %f6, %f1;
        sqrt.approx.f32 %f7, %f1;
        fma.rn.f32 %f8, %f1, %f2, %f3;
        fma.rn.f32 %f9, %f1, %f2, %f8;
        fma.rn.f64 %fd3, %fd1, %fd2, %fd1;
        div.rn.f64 %fd4, %fd1, %fd2;
    """
    assert inexact_opcodes(ptx) == {"div.full.f32": 1, "rcp.approx.f32": 1, "sqrt.approx.f32": 1, "fma.rn.f32": 2}
    assert set(inexact_opcodes(ptx)) <= set(INEXACT_OPCODES)


def test_fma_contraction_is_part_of_the_specialization():
    """A launch with FMA contraction is another specialization than the declared one without."""
    boxes = torch.empty((1, 1, 4))
    args, meta = box_iou._iou_arguments(boxes, boxes, boxes, boxes, boxes, "iou", "xyxy", 1e-7)
    assert meta["enable_fp_fusion"] is False
    declared = {spec.key for spec in box_iou.AOT_SPECS}
    kernel = box_iou._pairwise_iou_kernel
    assert specialization_key(kernel, args, meta) in declared
    assert specialization_key(kernel, args, {**meta, "enable_fp_fusion": True}) not in declared


def test_exact_kernels_have_only_ieee_arithmetic(results):
    """No approximate division, reciprocal or square root and no FMA in the PTX of any kernel of
    an ``EXACT_KERNELS`` set (the IoU, NMS, matcher, RoI pooling and anchor kernels)."""
    failures = compile_report.ptx_lint_failures(results)
    assert not failures, "\n".join(failures)
    linted = {
        r.kernel.split("[")[0]
        for (_, r), lint in zip(results, compile_report.ptx_lint(results), strict=True)
        if lint == "exact"
    }
    for kernel in (
        "_pairwise_iou_kernel",
        "_suppression_mask_kernel",
        "_padded_suppression_mask_kernel",
        "_match_kernel",
    ):
        assert kernel in linted
