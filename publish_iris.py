"""The Iris chapter at the paper's protocol (60,000 + 7,500 steps, every depth and width) with 50 seeds, published
into this worktree's result store; resumable (finished jobs are cached; rerun to continue and publish)."""

import logging

from fragile.chapters import iris

if __name__ == "__main__":  # the local cluster's workers import this file
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cfg = iris.IrisConfig(n_seeds=50, profile="paper", scheduler="local", publish=True, store_dir="results/store")
    results, report = iris.run_study(cfg, progress=False)
    print(report.summary())
