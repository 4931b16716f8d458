"""Multi-layer SAEs (Lawson et al. 2024, "Residual Stream Analysis with Multi-Layer SAEs",
arXiv 2409.04185; code tim-lawson/mlsae): one TopK dictionary over every layer's residual stream.

Modules: :mod:`~saeflow.mlsae.math` (pure functions: standardisation, loss and gradients, layer
statistics, MMCS), :mod:`~saeflow.mlsae.train` (the training stage).
"""
