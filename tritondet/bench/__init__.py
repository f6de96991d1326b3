"""The benchmark suite, shipped with the package: our ops and detector against torchvision's.

- :mod:`~tritondet.bench.harness`: the one runner (``Case``, ``CountCase``, ``measure`` -> ``Row``);
- :mod:`~tritondet.bench.cases`: one module of cases per op family;
- :mod:`~tritondet.bench.suite`: ``run_suite``, every case measured (``tritondet bench``);
- :mod:`~tritondet.bench.report`: the rows to CSV, markdown and plots;
- :mod:`~tritondet.bench.inputs`: box sets, torchvision's detector twin and the parity check,
  shared with the tests.
"""
