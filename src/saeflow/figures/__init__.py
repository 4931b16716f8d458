"""Figures, each drawn only from the CSV table behind it (``tables/figureN.csv`` -> ``plots/``).

- :mod:`saeflow.figures.dark_matter`: Figures 1-7, 10a and 11-14 of "Decomposing the Dark Matter
  of SAEs" (the mapping to the original files is in :mod:`saeflow.dark_matter.scaling`).
- :mod:`saeflow.figures.error_effects`: Figures 9, 10b and 15.
- :mod:`saeflow.figures.figure8`: Figure 8 (auto-interpretation of the error SAEs).
- :mod:`saeflow.figures.pdf`: reading a plot's table and writing its PDF, shared by all three.

Figure modules use matplotlib's object API on an Agg canvas (no pyplot state, no seaborn) and
write PDFs without a creation date, so the same table gives the same file.
"""
