"""The fully-connected net of the batch-normalization seed (cs231n's
``FullyConnectedNet`` with ``use_batchnorm``), on fastbn's layer.

Architecture: ``{affine - [batch norm] - relu} x (L - 1) - affine - softmax``.
Batch normalization runs through :class:`fastbn.nn.BatchNorm`, so every
backend of fastbn can train the net.
"""
import time

import numpy as np

from ..nn import BatchNorm


def softmax_loss(scores, y):
    """Mean cross-entropy of the softmax of ``scores`` and its gradient.

    Parameters
    ----------
    scores : ndarray of shape (N, C)
    y : ndarray of int, shape (N,)

    Returns
    -------
    loss : float
    dscores : ndarray of shape (N, C)
    """
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = scores.shape[0]
    loss = -log_probs[np.arange(n), y].mean()
    # d loss / d scores = (softmax - onehot) / N
    dscores = np.exp(log_probs)
    dscores[np.arange(n), y] -= 1
    dscores /= n
    return float(loss), dscores


class FullyConnectedNet:
    """Fully-connected net with ReLU, optional batch normalization, softmax loss.

    Parameters
    ----------
    hidden_dims : sequence of int
        Width of each hidden layer.
    input_dim : int, default 64
        Size of one input (the 8x8 digits flattened).
    num_classes : int, default 10
    use_batchnorm : bool, default False
        Insert a batch-norm layer between each hidden affine layer and its ReLU.
    reg : float, default 0
        L2 regularization strength: the loss adds ``0.5 * reg * sum(W**2)``
        over the weight matrices.
    weight_scale : float, default 1e-2
        Standard deviation of the normally distributed initial weights
        (biases start at 0, batch-norm scales at 1 and shifts at 0).
    dtype : dtype, default float32
        Dtype of every parameter and computation (float64 for gradient checks).
    seed : int or sequence of int, default 0
        Seed of the initial weights.
    backend : str, optional
        fastbn backend of the batch-norm layers.
    bn_momentum : float, default 0.1
        Momentum of the running statistics (PyTorch's convention).

    Attributes
    ----------
    params : dict of ndarray
        ``W1, b1, ..., WL, bL`` and, with batch norm, ``gamma1, beta1, ...``
        for the hidden layers.
    bn_layers : list of fastbn.nn.BatchNorm
    timing : dict
        Seconds spent in ``batchnorm_forward`` and ``batchnorm_backward``
        (accumulated over every call of :meth:`loss`).
    """

    def __init__(self, hidden_dims, input_dim=64, num_classes=10, use_batchnorm=False,
                 reg=0.0, weight_scale=1e-2, dtype=np.float32, seed=0, backend=None,
                 bn_momentum=0.1):
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.use_batchnorm = bool(use_batchnorm)
        self.reg = float(reg)
        self.dtype = np.dtype(dtype)
        self.num_layers = len(self.hidden_dims) + 1
        rng = np.random.default_rng(seed)
        dims = [int(input_dim), *self.hidden_dims, int(num_classes)]
        self.params = {}
        for i in range(self.num_layers):
            weights = weight_scale * rng.standard_normal((dims[i], dims[i + 1]))
            self.params[f"W{i + 1}"] = weights.astype(self.dtype)
            self.params[f"b{i + 1}"] = np.zeros(dims[i + 1], dtype=self.dtype)
        self.bn_layers = []
        if self.use_batchnorm:
            for i, width in enumerate(self.hidden_dims):
                layer = BatchNorm(width, momentum=bn_momentum, dtype=self.dtype, backend=backend)
                self.bn_layers.append(layer)
                self.params[f"gamma{i + 1}"] = layer.gamma
                self.params[f"beta{i + 1}"] = layer.beta
        self.timing = {"batchnorm_forward": 0.0, "batchnorm_backward": 0.0}

    def loss(self, X, y=None):
        """Scores (``y=None``, evaluation mode) or loss and gradients (training mode).

        Parameters
        ----------
        X : ndarray of shape (N, input_dim)
        y : ndarray of int, shape (N,), optional

        Returns
        -------
        scores : ndarray of shape (N, num_classes)
            When ``y`` is None.
        loss, grads : float, dict of ndarray
            Otherwise; ``grads`` has the keys of ``params``.
        """
        X = np.asarray(X, dtype=self.dtype).reshape(X.shape[0], -1)
        training = y is not None
        hidden = X
        caches = []
        for i in range(self.num_layers - 1):
            W, b = self.params[f"W{i + 1}"], self.params[f"b{i + 1}"]
            affine = hidden @ W + b
            if self.use_batchnorm:
                layer = self.bn_layers[i]
                # The parameters may have been replaced (e.g. best parameters restored).
                layer.gamma = self.params[f"gamma{i + 1}"]
                layer.beta = self.params[f"beta{i + 1}"]
                layer.train(training)
                start = time.perf_counter()
                affine = layer.forward(affine)
                self.timing["batchnorm_forward"] += time.perf_counter() - start
            caches.append((hidden, affine))
            hidden = np.maximum(affine, 0)
        W, b = self.params[f"W{self.num_layers}"], self.params[f"b{self.num_layers}"]
        scores = hidden @ W + b
        if not training:
            return scores

        loss, dscores = softmax_loss(scores, y)
        grads = {}
        last = self.num_layers
        grads[f"W{last}"] = hidden.T @ dscores
        grads[f"b{last}"] = dscores.sum(axis=0)
        dhidden = dscores @ W.T
        for i in reversed(range(self.num_layers - 1)):
            layer_input, relu_input = caches[i]
            daffine = dhidden * (relu_input > 0)
            if self.use_batchnorm:
                layer = self.bn_layers[i]
                start = time.perf_counter()
                daffine = layer.backward(daffine)
                self.timing["batchnorm_backward"] += time.perf_counter() - start
                grads[f"gamma{i + 1}"] = layer.grad_gamma
                grads[f"beta{i + 1}"] = layer.grad_beta
            grads[f"W{i + 1}"] = layer_input.T @ daffine
            grads[f"b{i + 1}"] = daffine.sum(axis=0)
            if i > 0:
                dhidden = daffine @ self.params[f"W{i + 1}"].T
        for i in range(self.num_layers):
            W = self.params[f"W{i + 1}"]
            loss += 0.5 * self.reg * float(np.sum(W * W))
            grads[f"W{i + 1}"] = grads[f"W{i + 1}"] + self.reg * W
        for name, grad in grads.items():
            grads[name] = np.asarray(grad, dtype=self.dtype)
        return loss, grads
