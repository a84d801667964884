"""The handwritten digits of scikit-learn, split and standardized.

scikit-learn ships the data inside its package (1797 images of 8x8 pixels,
values 0-16, ten classes), so nothing is downloaded. scikit-learn is an
optional dependency: ``pip install "fastbn[experiments]"``.
"""
import numpy as np

#: Sizes of the fixed split (1000 training images, as the seed notebook's subset).
NUM_TRAIN = 1000
NUM_VAL = 397
NUM_TEST = 400
#: Seed of the fixed permutation behind the split (independent of the experiment seed).
SPLIT_SEED = 20150211


def load_digits_data(dtype=np.float64):
    """Training, validation and test sets of the digits, standardized.

    The split is fixed (a permutation drawn from :data:`SPLIT_SEED`):
    1000 training, 397 validation and 400 test images. Each of the 64
    pixels is standardized with the mean and standard deviation of the
    training images only (pixels constant over the training set are only
    centred).

    Parameters
    ----------
    dtype : dtype, default float64
        Dtype of the images.

    Returns
    -------
    data : dict
        ``X_train``, ``y_train``, ``X_val``, ``y_val``, ``X_test``,
        ``y_test``: images ``(n, 64)`` and integer labels ``(n,)``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: "
                          "pip install 'fastbn[experiments]'") from error
    digits = load_digits()
    images = np.asarray(digits.data, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train = order[:NUM_TRAIN]
    val = order[NUM_TRAIN:NUM_TRAIN + NUM_VAL]
    test = order[NUM_TRAIN + NUM_VAL:NUM_TRAIN + NUM_VAL + NUM_TEST]

    mean = images[train].mean(axis=0)
    std = images[train].std(axis=0)
    std[std == 0] = 1.0

    def standardize(rows):
        return ((images[rows] - mean) / std).astype(dtype)

    return {
        "X_train": standardize(train), "y_train": labels[train],
        "X_val": standardize(val), "y_val": labels[val],
        "X_test": standardize(test), "y_test": labels[test],
    }
