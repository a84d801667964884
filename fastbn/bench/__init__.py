"""fastbn's benchmarks: one timing core, the shared kernels, suites and reports.

* :mod:`fastbn.bench.timing`: interleaved rounds, statistics, load, copy limit;
* :mod:`fastbn.bench.kernels`: the data and kernels every benchmark times
  (also the asv suite in ``benchmarks/`` and pytest-benchmark);
* :mod:`fastbn.bench.peer`: PyTorch's kernels, timed in a process of their own;
* :mod:`fastbn.bench.report`: the Markdown page and its JSON;
* :mod:`fastbn.bench.suites`: one module per ``fastbn bench --suite NAME``.
"""
from .kernels import (DTYPES, Kernels, format_shape, make_data,  # noqa: F401
                      parse_dtypes, parse_shape, parse_shapes, why_unsupported)
from .timing import fraction_of_copy_limit, interleaved  # noqa: F401
