"""saeflow: a reproducible Snakemake pipeline for sparse-autoencoder research.

The package holds thin stage modules (``python -m saeflow.<stage>``) over pure library code.
"""

__version__ = "0.1.0"
