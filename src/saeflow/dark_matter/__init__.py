"""Dark-matter analyses of SAE errors ("Decomposing the Dark Matter of SAEs", arXiv 2410.14670).

Pure library code (tensors in, named results out):

- :mod:`saeflow.dark_matter.regression`: streaming least squares (normal equations with a bias
  column, float64) and streaming R²; seeded train/test splits of token rows.
- :mod:`saeflow.dark_matter.power_law`: FVU(W) = c + a·W^(-m) with a, m, c >= 0, plus bootstrap
  uncertainty.
- :mod:`saeflow.dark_matter.pursuit`: batched non-negative gradient pursuit on an SAE's decoder.

Stage modules (``python -m ...``):

- :mod:`saeflow.dark_matter.error_split`: linear / nonlinear decomposition of the SAE error.
"""
