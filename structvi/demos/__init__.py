"""The demos behind ``structvi demo``, shipped with the package.

Each module has ``run(out_dir, quick=False, show=True) -> dict`` that trains, prints a Markdown
table and saves one PNG into ``out_dir``; the result holds ``"table"`` and ``"png"``.

* :mod:`structvi.demos.logistic`: Bayesian logistic regression, three structures against Pyro's
  autoguides (``logistic_regression.png``).
* :mod:`structvi.demos.bnn`: a Pyro Bayesian neural network, Kronecker-structured VI against
  ``AutoNormal`` + Adam (``bnn_calibration.png``).
* :mod:`structvi.demos.optimizer`: ``StructuredNGD`` against AdamW on a digits CNN
  (``optimizer_digits.png``).
"""
