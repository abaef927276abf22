"""Visualisations: retrieval grids (``retrieval_grid``), attention maps, curves."""
