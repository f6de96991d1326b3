"""Measuring tools, apart from the model: exact dispatch counts, post-processing stage costs, the compile report.

- :mod:`~tritondet.measure.dispatch_audit`: ``NoHostSync``, ``DispatchCounter``, ``measure_costs``
  (ATen ops, host syncs and launches of a call, counted exactly);
- :mod:`~tritondet.measure.memory`: ``peak_allocated_bytes`` (the peak memory of a call, CPU and CUDA);
- :mod:`~tritondet.measure.stage_costs`: the detector's post-processing stages, ours against torchvision's;
- :mod:`~tritondet.measure.compile_report`: every kernel compiled ahead of time for sm_80 / sm_90.
"""
