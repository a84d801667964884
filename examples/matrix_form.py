"""Gradients of a batch-normalized regression net in matrix form.

The net of the matrix-form question (seed 004)::

    Z = X @ G1                      X: (N, p1), G1: (p1, p2)
    H = BN(Z; gamma, beta)          per column: (Z - mean) / sqrt(var + eps) * gamma + beta
    V = relu(H)
    yhat = V @ G2                   G2: (p2, 1)
    R = mean((y - yhat) ** 2)

Backward, as matrix products around ``fastbn.batchnorm_backward``
(``1`` is the column of N ones, ``*`` the elementwise product)::

    dyhat   = -2 / N * (y - yhat)                     (N, 1)
    dG2     = V.T @ dyhat                             (p2, 1)
    S       = (dyhat @ G2.T) * (H > 0)                (N, p2)   dR/dH, the "stub"
    dbeta   = 1.T @ S                                 (p2,)
    dgamma  = 1.T @ (Zhat * S)  = diag(Zhat.T @ S)    (p2,)
    dZ      = (S - 1 @ dbeta / N - Zhat * dgamma / N) @ diag(gamma * invstd)
    dG1     = X.T @ dZ                                (p1, p2)

``dZ``, ``dgamma`` and ``dbeta`` are what ``fastbn.batchnorm_backward(S,
cache)`` returns. The two middle terms of ``dZ`` are the paths through the
column means and variances; dropping them (treating the statistics as
constants) gives ``X.T @ (S @ diag(gamma * invstd))``, which is not the
gradient. The script checks the matrix form against centred differences
and against a loop over single nodes, and prints how far that
constant-statistics shortcut is from the gradient.

Run: ``python examples/matrix_form.py``.
"""
import numpy as np

import fastbn
from fastbn.gradcheck import eval_numerical_gradient, rel_error

EPS = 1e-5


def make_problem(seed=1, N=10, p1=7, p2=4):
    """The question's sizes and parameters: gamma = 2..p2+1, beta = -gamma."""
    rng = np.random.default_rng(seed)
    G1 = rng.standard_normal((p1, p2))
    G2 = rng.standard_normal((p2, 1))
    gamma = np.arange(2.0, p2 + 2.0)
    beta = -gamma.copy()
    X = np.round(rng.uniform(-5, 5, (N, p1)))
    noise = rng.standard_normal((N, 1))
    y = loss_and_output(X, G1, G2, gamma, beta, np.zeros((N, 1)))[1] + noise
    return {"X": X, "y": y, "G1": G1, "G2": G2, "gamma": gamma, "beta": beta}


def loss_and_output(X, G1, G2, gamma, beta, y, backend=None):
    """Forward pass: ``(R, yhat)``."""
    H, _ = fastbn.batchnorm_forward(X @ G1, gamma, beta, eps=EPS, backend=backend)
    yhat = np.maximum(H, 0) @ G2
    return float(np.mean((y - yhat) ** 2)), yhat


def gradients_matrix(X, y, G1, G2, gamma, beta, backend=None):
    """Gradients of ``R`` by matrix products around ``batchnorm_backward``.

    Returns
    -------
    grads : dict
        ``G1``, ``G2``, ``gamma``, ``beta``.
    """
    N = X.shape[0]
    Z = X @ G1
    H, cache = fastbn.batchnorm_forward(Z, gamma, beta, eps=EPS, backend=backend)
    V = np.maximum(H, 0)
    yhat = V @ G2
    dyhat = -2.0 / N * (y - yhat)
    dG2 = V.T @ dyhat
    S = (dyhat @ G2.T) * (H > 0)
    dZ, dgamma, dbeta = fastbn.batchnorm_backward(S, cache)
    dG1 = X.T @ dZ
    return {"G1": dG1, "G2": dG2, "gamma": dgamma, "beta": dbeta}


def gradients_closed_form(X, y, G1, G2, gamma, beta):
    """The same gradients with the batch-norm backward written out in matrices
    (NumPy only), as in the module docstring."""
    N = X.shape[0]
    ones = np.ones((N, 1))
    Z = X @ G1
    mean = ones.T @ Z / N                                 # (1, p2)
    centred = Z - ones @ mean
    invstd = 1.0 / np.sqrt(ones.T @ centred ** 2 / N + EPS)
    Zhat = centred * invstd
    H = Zhat * gamma + ones @ beta[None, :]
    V = np.maximum(H, 0)
    dyhat = -2.0 / N * (y - V @ G2)
    S = (dyhat @ G2.T) * (H > 0)
    dbeta = (ones.T @ S).ravel()
    dgamma = np.diag(Zhat.T @ S).copy()
    dZ = (S - ones @ dbeta[None, :] / N - Zhat * dgamma / N) @ np.diag(gamma * invstd.ravel())
    return {"G1": X.T @ dZ, "G2": V.T @ dyhat, "gamma": dgamma, "beta": dbeta}


def gradients_loop(X, y, G1, G2, gamma, beta):
    """The same gradients node by node: plain loops over samples and units."""
    N, p1 = X.shape
    p2 = G1.shape[1]
    Z = [[sum(X[i, k] * G1[k, j] for k in range(p1)) for j in range(p2)] for i in range(N)]
    mean = [sum(Z[i][j] for i in range(N)) / N for j in range(p2)]
    var = [sum((Z[i][j] - mean[j]) ** 2 for i in range(N)) / N for j in range(p2)]
    invstd = [1.0 / (var[j] + EPS) ** 0.5 for j in range(p2)]
    Zhat = [[(Z[i][j] - mean[j]) * invstd[j] for j in range(p2)] for i in range(N)]
    H = [[gamma[j] * Zhat[i][j] + beta[j] for j in range(p2)] for i in range(N)]
    V = [[max(H[i][j], 0.0) for j in range(p2)] for i in range(N)]
    yhat = [sum(V[i][j] * G2[j, 0] for j in range(p2)) for i in range(N)]
    dyhat = [-2.0 / N * (y[i, 0] - yhat[i]) for i in range(N)]

    dG2 = np.zeros((p2, 1))
    dG1 = np.zeros((p1, p2))
    dgamma = np.zeros(p2)
    dbeta = np.zeros(p2)
    for j in range(p2):
        dG2[j, 0] = sum(V[i][j] * dyhat[i] for i in range(N))
        s = [dyhat[i] * G2[j, 0] * (1.0 if H[i][j] > 0 else 0.0) for i in range(N)]
        dbeta[j] = sum(s)
        dgamma[j] = sum(s[i] * Zhat[i][j] for i in range(N))
        # d zhat_i / d z_l = invstd * (delta_il - 1/N - zhat_i zhat_l / N)
        for l in range(N):
            dz = gamma[j] * invstd[j] * sum(
                s[i] * ((1.0 if i == l else 0.0) - 1.0 / N - Zhat[i][j] * Zhat[l][j] / N)
                for i in range(N))
            for k in range(p1):
                dG1[k, j] += X[l, k] * dz
    return {"G1": dG1, "G2": dG2, "gamma": dgamma, "beta": dbeta}


def gradients_numerical(X, y, G1, G2, gamma, beta, h=1e-6):
    """Centred differences of ``R`` (``fastbn.gradcheck``)."""
    params = {"G1": G1.copy(), "G2": G2.copy(), "gamma": gamma.copy(), "beta": beta.copy()}

    def loss(_):
        return loss_and_output(X, params["G1"], params["G2"], params["gamma"],
                               params["beta"], y, backend="numpy")[0]

    return {name: eval_numerical_gradient(loss, params[name], h=h) for name in params}


def constant_statistics_G1(X, y, G1, G2, gamma, beta):
    """The shortcut ``X.T @ (S * gamma * invstd)``: statistics taken as constants."""
    N = X.shape[0]
    H, cache = fastbn.batchnorm_forward(X @ G1, gamma, beta, eps=EPS, backend="numpy")
    S = (-2.0 / N * (y - np.maximum(H, 0) @ G2) @ G2.T) * (H > 0)
    return X.T @ (S * (gamma * cache.invstd))


def main():
    problem = make_problem()
    args = (problem["X"], problem["y"], problem["G1"], problem["G2"],
            problem["gamma"], problem["beta"])
    numerical = gradients_numerical(*args)
    loop = gradients_loop(*args)
    closed = gradients_closed_form(*args)
    print(f"{'backend':<8} {'param':<6} {'vs numerical':>13} {'vs loop':>10} {'vs closed form':>15}")
    for backend in fastbn.available_backends():
        if backend == "cuda":
            continue
        matrix = gradients_matrix(*args, backend=backend)
        for name in ("G1", "G2", "gamma", "beta"):
            print(f"{backend:<8} {name:<6} {rel_error(matrix[name], numerical[name]):>13.1e} "
                  f"{rel_error(matrix[name], loop[name]):>10.1e} "
                  f"{rel_error(matrix[name], closed[name]):>15.1e}")
    shortcut = constant_statistics_G1(*args)
    print(f"constant-statistics shortcut for G1 vs numerical: "
          f"{rel_error(shortcut, numerical['G1']):.1e} (not the gradient)")


if __name__ == "__main__":
    main()
