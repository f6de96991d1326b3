"""The benchmark cases, one module per op family: ``cases(device, sizes) -> list[Case | CountCase]``.

Each module builds our op and torchvision's on the same inputs at the sizes a detector really uses
(``tiny``, ``quick`` or ``full``, :func:`tritondet.bench.harness.bench_sizes`). ``tritondet bench``
runs every module here; ``benchmarks/bench_<family>.py`` runs one under pytest-benchmark.
"""

import pkgutil

FAMILIES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
