"""Models shipped with infergate.

``DIGITS_MODEL`` is a small handwritten-digits classifier (an MLP trained on
scikit-learn's bundled 8x8 digits, upsampled to the 28x28 MNIST layout) with the
MNIST signature of the EAS manual:

* input ``images``: float32 [N, 784], pixel values in 0..1 (N is dynamic, "batch");
* output ``scores``: float32 [N, 10], softmax probabilities of the digits 0..9;
* signature name ``predict_images`` (ONNX metadata_props key "signature_name").

It is built by ``python -m gateway.models.build_digits``. Nothing here imports
scikit-learn or onnx at import time: both are test/dev dependencies only
(``load_held_out_digits`` reads the shipped copy of the held-out digits).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DIGITS_MODEL", "SIGNATURE_NAME", "INPUT_NAME", "OUTPUT_NAME", "to_mnist_layout",
           "load_digits_split", "load_held_out_digits"]

DIGITS_MODEL: Path = Path(__file__).resolve().parent / "digits.onnx"
# The 360 held-out digits (8x8, 0..16, and their labels): what the demo sends, shipped so
# that `pip install infergate; infergate demo` needs no scikit-learn.
HELD_OUT: Path = Path(__file__).resolve().parent / "digits_held_out.npz"
SIGNATURE_NAME = "predict_images"
INPUT_NAME = "images"
OUTPUT_NAME = "scores"

_SRC = 8    # sklearn digits are 8x8, values 0..16
_DST = 28   # MNIST layout: 28x28 = 784, values 0..1
_MAX_VALUE = 16.0


def _interpolation_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] bilinear weights (pixel centres aligned, edges clamped)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    pos = np.clip(pos, 0.0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    weights = np.zeros((dst, src), dtype=np.float64)
    rows = np.arange(dst)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


_UPSAMPLE = _interpolation_matrix(_SRC, _DST)


def to_mnist_layout(images_8x8) -> np.ndarray:
    """sklearn 8x8 digit images (values 0..16) -> float32 [N, 784] in 0..1.

    Accepts [N, 8, 8] or [N, 64] (or a single [8, 8] / [64] image, giving [1, 784]).
    Bilinear upsampling with fixed weights: numpy only, deterministic.
    """
    x = np.asarray(images_8x8, dtype=np.float64)
    if x.shape[-2:] != (_SRC, _SRC):
        if x.shape[-1] != _SRC * _SRC:
            raise ValueError(f"expected 8x8 images ([N, 8, 8] or [N, 64]), got shape {x.shape}")
        x = x.reshape(*x.shape[:-1], _SRC, _SRC)
    x = x.reshape(-1, _SRC, _SRC)
    up = _UPSAMPLE @ x @ _UPSAMPLE.T  # [N, 28, 28]
    up = np.clip(up / _MAX_VALUE, 0.0, 1.0)
    return up.reshape(-1, _DST * _DST).astype(np.float32)


def load_held_out_digits():
    """(x_test, y_test) of load_digits_split(), from the copy shipped with infergate."""
    with np.load(HELD_OUT) as data:
        return to_mnist_layout(data["images"]), data["labels"].astype(np.int64)


def load_digits_split():
    """(x_train, y_train, x_test, y_test) from sklearn's bundled digits, MNIST layout.

    Fixed split: every 5th sample (index % 5 == 0) is held out, 360 of 1797; no RNG.
    x arrays are float32 [N, 784] in 0..1, y arrays int64 labels 0..9.
    Needs scikit-learn (a test/dev dependency).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = to_mnist_layout(digits.images)
    y = np.asarray(digits.target, dtype=np.int64)
    test = np.arange(len(y)) % 5 == 0
    return x[~test], y[~test], x[test], y[test]
