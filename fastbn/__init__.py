"""fastbn: fast batch-normalization kernels behind one interface.

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).standard_normal((64, 16, 8, 8)).astype(np.float32)
>>> out, cache = fastbn.batchnorm_forward(x)
>>> dx, dgamma, dbeta = fastbn.batchnorm_backward(np.ones_like(x), cache)
"""
from . import gradcheck
from .api import batchnorm_backward, batchnorm_forward
from .cache import BatchNormCache
from .fold import fold_batchnorm
from .registry import available_backends, backend_info, set_backend, use_backend

__version__ = "0.1.0"

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
