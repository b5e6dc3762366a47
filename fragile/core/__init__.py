"""The numerical core: objective, curvature, solvers, training, ground truths, metrics and selections.

It knows nothing of chapters, Dask, papermill or plotting; everything above it builds on it.
"""
