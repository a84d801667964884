# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# The formulas of batch normalization, written once: every loop of the
# kernels computes y, the ReLU, its mask and dx through these helpers, so
# the backward's mask is the forward's `out > 0` by construction.
#
# float32 arithmetic (float32 and 16-bit data) centres with a split mean
# mean = hi + lo (two float32): (x - hi) - lo is x - mean to float32
# rounding even when |mean| >> std. float64 data are computed in float64.
# Per-channel coefficients are float64, computed here for every path, so
# that all paths agree bit for bit.

from libc.math cimport sqrt

from .half cimport floating


cdef inline void split(double v, float* hi, float* lo) noexcept nogil:
    # v = hi + lo to about float32^2 precision.
    hi[0] = <float>v
    lo[0] = <float>(v - <double>hi[0])


# ---------------------------------------------------------------------------
# Elementwise
# ---------------------------------------------------------------------------

cdef inline float y_f32(float x, float mean_hi, float mean_lo, float scale,
                        float offset) noexcept nogil:
    # The forward's normalize: y = (x - mean) * scale + offset, with
    # scale = invstd * gamma and offset = beta (not split).
    return ((x - mean_hi) - mean_lo) * scale + offset


cdef inline double y_f64(double x, double mean, double scale, double offset) noexcept nogil:
    return (x - mean) * scale + offset


cdef inline floating relu_value(floating y) noexcept nogil:
    # max(y, 0) of the fused ReLU; NaN stays NaN.
    return 0 if y < 0 else y


cdef inline floating mask_dy(floating dy, floating y, floating floor) noexcept nogil:
    # The ReLU's backward: dy where the forward's stored max(y, 0) > 0, else 0.
    # floor is the largest y the store rounds to 0 (half.stored_as_zero): 0
    # when y is computed in the storage dtype, 2**-25 for float16 data and
    # 2**-134 for bfloat16 (y in float32), so a tiny y the forward stored as
    # 0 is masked too.
    return dy if y > floor else 0


cdef inline float dx_f32(float dy, float x, float mean_hi, float mean_lo, float k_scale,
                         float mean_dy_hi, float mean_dy_lo, float k_xmu) noexcept nogil:
    # The simplified backward: dx = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
    # (coefficients from elemt_coefs), dy - mean_dy centred with a split mean too.
    return k_scale * (((dy - mean_dy_hi) - mean_dy_lo) - ((x - mean_hi) - mean_lo) * k_xmu)


cdef inline double dx_f64(double dy, double x, double mean, double k_scale, double mean_dy,
                          double k_xmu) noexcept nogil:
    return k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)


# ---------------------------------------------------------------------------
# Per channel, float64
# ---------------------------------------------------------------------------

cdef inline double merge(const double* partials, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    # Partial sums added in chunk order.
    cdef double total = 0.0
    cdef Py_ssize_t k
    for k in range(n):
        total += partials[k * stride]
    return total


cdef inline void forward_coefs(Py_ssize_t c, double sum_u, double sum_uu, double shift,
                               double M, double eps, const double* gamma,
                               const double* beta, double* mean, double* var,
                               double* scale, double* offset) noexcept nogil:
    # Shifted sums, K = shift: mean = K + sum(x - K) / M and
    # var = sum((x - K)^2) / M - (sum(x - K) / M)^2; a constant channel has
    # var == 0 exactly.
    cdef double d = sum_u / M
    cdef double v = sum_uu / M - d * d
    if v < 0.0:          # rounding only; NaN fails the test and stays NaN
        v = 0.0
    mean[c] = shift + d
    var[c] = v
    # invstd * gamma, rounded as normalize() and the ReLU backward compute it
    scale[c] = (1.0 / sqrt(v + eps)) * gamma[c]
    offset[c] = beta[c]


cdef inline void elemt_coefs(Py_ssize_t c, double sum_dy, double sum_dy_xhat, double M,
                             const double* invstd, const double* gamma, double* k_scale,
                             double* k_mean_dy, double* k_xmu) noexcept nogil:
    # dx = gamma * invstd * ((dy - sum_dy / M) - (x - mean) * invstd * sum_dy_xhat / M)
    k_scale[c] = gamma[c] * invstd[c]
    k_mean_dy[c] = sum_dy / M
    k_xmu[c] = invstd[c] * sum_dy_xhat / M


cdef inline void backward_coefs(Py_ssize_t c, double sum_dy, double sum_dy_xmu, double M,
                                const double* invstd, const double* gamma,
                                double* out_sum_dy, double* out_sum_dy_xhat,
                                double* k_scale, double* k_mean_dy,
                                double* k_xmu) noexcept nogil:
    # sum_dy_xhat = invstd * sum(dy * (x - mean)), then elemt_coefs.
    cdef double sum_dy_xhat = sum_dy_xmu * invstd[c]
    out_sum_dy[c] = sum_dy
    out_sum_dy_xhat[c] = sum_dy_xhat
    elemt_coefs(c, sum_dy, sum_dy_xhat, M, invstd, gamma, k_scale, k_mean_dy, k_xmu)
