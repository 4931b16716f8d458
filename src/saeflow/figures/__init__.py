"""Figures, each drawn only from the CSV table behind it (``tables/figureN.csv`` -> ``plots/``).

- :mod:`saeflow.figures.dark_matter`: Figures 1-4 of "Decomposing the Dark Matter of SAEs"
  (the mapping to the original files is in :mod:`saeflow.dark_matter.scaling`).

Figure modules use matplotlib's object API on an Agg canvas (no pyplot state, no seaborn) and
write PDFs without a creation date, so the same table gives the same file.
"""
