"""The 8x8 handwritten digits of examples/data/digits.csv.gz (the copy scikit-learn ships; see
examples/data/README.md), read with NumPy alone."""

from __future__ import annotations

from pathlib import Path

DIGITS_CSV = Path(__file__).resolve().parent / "data" / "digits.csv.gz"


def load_digits():
    """Returns ``(images, labels)``: 1,797 rows of 64 pixel counts in 0..16 (float64), and the digits (int64)."""
    import numpy as np

    data = np.loadtxt(DIGITS_CSV, delimiter=",")
    return data[:, :-1], data[:, -1].astype("int64")
