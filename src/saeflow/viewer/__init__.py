"""The feature viewer: ``python -m saeflow.viewer --db results/features.sqlite``."""
