"""The suites of ``fastbn bench --suite NAME``.

A suite is one module of this package with one function, ``run(options)``,
that times what it compares with :mod:`fastbn.bench.timing` and returns a
:class:`fastbn.bench.report.Report`. It is registered by one line in
:data:`SUITES`. A suite reads the fields of :class:`Options` that it needs
and ignores the others; it parses no command line.
"""
import dataclasses
import importlib

# suite name -> (module in this package, what it times)
SUITES = {
    "default": ("default", "every CPU backend vs PyTorch CPU: forward, simplified and staged "
                           "backward, fraction of the copy limit"),
    "small": ("small", "per-call overhead on tiny shapes and in-cache shapes vs PyTorch"),
    "half-relu": ("half_relu", "16-bit storage and the fused batch norm + ReLU"),
    "threads": ("threads", "thread scaling of every CPU backend and PyTorch"),
    "mpi": ("mpi", "synchronized batch norm over MPI: bytes and time per step"),
    "cuda": ("cuda", "the cuda backend vs PyTorch CUDA"),
    "torch-model": ("torch_model", "torchvision ResNets on the CPU: stock vs fastbn batch norm"),
}


@dataclasses.dataclass
class Options:
    """What a suite may be asked for; None means the suite's default.

    Attributes
    ----------
    profile : {"full", "quick", "tiny"}
        ``quick``: fewer shapes and rounds; ``tiny``: a check in seconds
        whose figures mean little.
    command : str
        The command line, written at the top of the report.
    shapes : list of tuple of int, optional
    dtypes : list of str, optional
    backends : list of str, optional
        fastbn backend names and/or ``"torch"``.
    threads : list of int, optional
    rounds : int, optional
    progress : bool
        One line per timed group on stderr.
    """

    profile: str = "full"
    command: str = "fastbn bench"
    shapes: list = None
    dtypes: list = None
    backends: list = None
    threads: list = None
    rounds: int = None
    progress: bool = False

    def pick(self, full, quick, tiny):
        """The value for this profile."""
        return {"full": full, "quick": quick, "tiny": tiny}[self.profile]


def run(name, options):
    """Run the suite ``name``.

    Returns
    -------
    fastbn.bench.report.Report

    Raises
    ------
    ValueError
        For an unknown suite name.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    module = importlib.import_module(f"{__name__}.{SUITES[name][0]}")
    return module.run(options).finish()


def progress(options, text):
    """One progress line on stderr, when asked for."""
    if options.progress:
        import sys
        print(f"[fastbn bench] {text}", file=sys.stderr, flush=True)
