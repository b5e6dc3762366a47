"""Running: the job cache, Dask sweeps, the papermill runner, the ``fragile`` command, provenance and devices."""
