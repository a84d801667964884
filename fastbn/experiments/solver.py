"""Minibatch training of a classification model (the seed's ``Solver``).

The model has a ``params`` dict of arrays and ``loss(X, y=None)`` returning
scores without labels and ``(loss, grads)`` with them. The solver samples
minibatches, updates the parameters in place (SGD with momentum or Adam),
records the loss of every step and the train/validation accuracy after each
epoch, and keeps the parameters of the best validation accuracy.
"""
import time

import numpy as np


def sgd_momentum(w, dw, config):
    """SGD with momentum, in place: ``v = mu * v - lr * dw; w += v``."""
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    velocity = config.get("velocity")
    if velocity is None:
        velocity = np.zeros_like(w)
    velocity *= config["momentum"]
    velocity -= config["learning_rate"] * dw
    w += velocity
    config["velocity"] = velocity


def adam(w, dw, config):
    """Adam (Kingma and Ba, 2015), in place, with bias-corrected moments."""
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    if config.get("m") is None:
        config["m"] = np.zeros_like(w)
        config["v"] = np.zeros_like(w)
    beta1, beta2 = config["beta1"], config["beta2"]
    config["t"] += 1
    m, v = config["m"], config["v"]
    m *= beta1
    m += (1 - beta1) * dw
    v *= beta2
    v += (1 - beta2) * dw * dw
    m_hat = m / (1 - beta1 ** config["t"])
    v_hat = v / (1 - beta2 ** config["t"])
    w -= config["learning_rate"] * m_hat / (np.sqrt(v_hat) + config["epsilon"])


UPDATE_RULES = {"sgd_momentum": sgd_momentum, "adam": adam}


class Solver:
    """Train a model with minibatch gradient descent.

    Parameters
    ----------
    model : object
        With ``params`` (dict of arrays) and ``loss(X, y=None)``.
    data : dict
        ``X_train``, ``y_train``, ``X_val``, ``y_val``.
    update_rule : {"sgd_momentum", "adam"}, default "sgd_momentum"
    optim_config : dict, optional
        Hyperparameters of the update rule (e.g. ``learning_rate``), copied
        for each parameter.
    lr_decay : float, default 1.0
        Factor applied to the learning rate after each epoch.
    batch_size : int, default 100
    num_epochs : int, default 10
    num_train_samples : int, default 1000
        Training images sampled to measure training accuracy.
    seed : int or sequence of int, default 0
        Seed of the minibatch sampling (with replacement, as the seed's solver).
    progress : callable, optional
        Called with no argument after every step (e.g. a progress bar's update).

    Attributes
    ----------
    loss_history : list of float
        Loss of every step.
    train_acc_history, val_acc_history : list of float
        Accuracy before training and after each epoch.
    best_val_acc : float
    best_params : dict of ndarray
        Copies of the parameters with the best validation accuracy; restored
        into the model when training ends.
    time : dict
        ``step_s``: seconds in training steps (loss, gradients, update);
        ``batchnorm_forward_s``, ``batchnorm_backward_s``: of which in the
        batch-norm calls (when the model has a ``timing`` dict).
    step_times, batchnorm_times : list of float
        Seconds of each step, and of the batch-norm calls in it.
    """

    def __init__(self, model, data, update_rule="sgd_momentum", optim_config=None,
                 lr_decay=1.0, batch_size=100, num_epochs=10, num_train_samples=1000,
                 seed=0, progress=None):
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {sorted(UPDATE_RULES)}, "
                             f"got {update_rule!r}")
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]
        self.update_rule = UPDATE_RULES[update_rule]
        self.optim_config = dict(optim_config or {})
        self.lr_decay = float(lr_decay)
        self.batch_size = int(batch_size)
        self.num_epochs = int(num_epochs)
        self.num_train_samples = int(num_train_samples)
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        self._reset()

    def _reset(self):
        self.epoch = 0
        self.best_val_acc = 0.0
        self.best_params = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        self.time = {"step_s": 0.0, "batchnorm_forward_s": 0.0, "batchnorm_backward_s": 0.0}
        self.step_times = []
        self.batchnorm_times = []

    def _step(self):
        """One minibatch update; returns nothing, records the loss and time."""
        timing = getattr(self.model, "timing", None)
        bn_before = dict(timing) if timing is not None else None
        start = time.perf_counter()
        batch = self.rng.choice(self.X_train.shape[0], self.batch_size)
        loss, grads = self.model.loss(self.X_train[batch], self.y_train[batch])
        for name, value in self.model.params.items():
            self.update_rule(value, grads[name], self.optim_configs[name])
        elapsed = time.perf_counter() - start
        self.time["step_s"] += elapsed
        self.step_times.append(elapsed)
        in_batchnorm = 0.0
        if timing is not None:
            for key in ("batchnorm_forward", "batchnorm_backward"):
                self.time[key + "_s"] += timing[key] - bn_before[key]
                in_batchnorm += timing[key] - bn_before[key]
        self.batchnorm_times.append(in_batchnorm)
        self.loss_history.append(loss)

    def check_accuracy(self, X, y, num_samples=None, batch_size=200):
        """Accuracy of the model (evaluation mode) on ``X``, ``y``.

        ``num_samples`` draws that many rows (from the solver's generator) first.
        """
        n = X.shape[0]
        if num_samples is not None and n > num_samples:
            rows = self.rng.choice(n, num_samples)
            X, y = X[rows], y[rows]
            n = num_samples
        predictions = []
        for start in range(0, n, batch_size):
            scores = self.model.loss(X[start:start + batch_size])
            predictions.append(np.argmax(scores, axis=1))
        return float(np.mean(np.concatenate(predictions) == y))

    def _record_accuracy(self):
        train_acc = self.check_accuracy(self.X_train, self.y_train, self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc or not self.best_params:
            self.best_val_acc = val_acc
            self.best_params = {name: value.copy() for name, value in self.model.params.items()}

    def train(self):
        """Run ``num_epochs`` epochs; restore the best parameters at the end."""
        num_train = self.X_train.shape[0]
        steps_per_epoch = max(num_train // self.batch_size, 1)
        self._record_accuracy()
        for epoch in range(self.num_epochs):
            for _ in range(steps_per_epoch):
                self._step()
                if self.progress is not None:
                    self.progress()
            self.epoch = epoch + 1
            for config in self.optim_configs.values():
                config["learning_rate"] = config.get("learning_rate", 1e-3) * self.lr_decay
            self._record_accuracy()
        for name, value in self.best_params.items():
            self.model.params[name][...] = value
        return self
