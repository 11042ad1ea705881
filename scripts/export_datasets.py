"""Export the two small datasets the demos use into ``structvi/data/*.npz`` (run once).

scikit-learn is not a runtime dependency of structvi; this script (which needs it) writes the
arrays the installed package ships::

    python scripts/export_datasets.py

``breast_cancer.npz``: ``X`` (569, 30) float64 raw features, ``y`` (569,) uint8 labels.
``digits.npz``: ``X`` (1797, 64) uint8 pixel values 0…16, ``y`` (1797,) uint8 labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "structvi" / "data"


def main() -> None:
    from sklearn.datasets import load_breast_cancer, load_digits

    X, y = load_breast_cancer(return_X_y=True)
    np.savez_compressed(OUT / "breast_cancer.npz", X=X.astype(np.float64), y=y.astype(np.uint8))
    X, y = load_digits(return_X_y=True)
    np.savez_compressed(OUT / "digits.npz", X=X.astype(np.uint8), y=y.astype(np.uint8))
    for f in sorted(OUT.glob("*.npz")):
        print(f"wrote {f} ({f.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
