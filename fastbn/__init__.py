"""fastbn: fast batch-normalization kernels behind one interface.

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).standard_normal((64, 16, 8, 8)).astype(np.float32)
>>> out, cache = fastbn.batchnorm_forward(x)
>>> dx, dgamma, dbeta = fastbn.batchnorm_backward(np.ones_like(x), cache)
"""
import os

from . import gradcheck
from .api import batchnorm_backward, batchnorm_forward
from .cache import BatchNormCache
from .fold import fold_batchnorm
from .registry import available_backends, backend_info, set_backend, use_backend

with open(os.path.join(os.path.dirname(__file__), "VERSION"), encoding="ascii") as _file:
    __version__ = _file.read().strip()
del _file

__all__ = [
    "BatchNormCache",
    "available_backends",
    "backend_info",
    "batchnorm_backward",
    "batchnorm_forward",
    "fold_batchnorm",
    "gradcheck",
    "set_backend",
    "use_backend",
]
