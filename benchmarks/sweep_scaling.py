"""The Iris grid through the sweep layer: 1 worker vs N workers, then again with a warm cache.

Runs the Iris chapter's jobs (one per architecture: its seeds with and without weight decay as one
stack, exact influence, batched leave-one-out) with the parameters of a profile (``default``: what
``make book`` runs), first on a Dask ``LocalCluster`` of one worker, then on one of ``--workers``
workers, each into a fresh cache, and finally the N-worker sweep again on its now warm cache. It checks
that both cold runs produced the same bits, and prints the wall times and the speed-up, measured side
by side in this one run. Cluster start-up is included (it is part of what a user waits for); a fully cached sweep starts none.

    python benchmarks/sweep_scaling.py [--profile default] [--workers 2] [--n-seeds N] [--train-steps N] [--retrain-steps N]

On this project's 2-core CI machine the ``default`` grid takes about 15 minutes in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import torch

from fragile.chapters import iris
from fragile.run import runner


def config(profile: str, overrides: dict) -> iris.IrisConfig:
    params = runner.load_profile(profile).get("01_iris", {})
    params.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(iris.IrisConfig)}
    return iris.IrisConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in fields})


def numbers(groups) -> list[torch.Tensor]:
    return [torch.as_tensor(r[k]) for g in groups for r in g["runs"] for k in ("predicted_all", "actual") if k in r]


def timed_sweep(cfg: iris.IrisConfig, workers: int) -> tuple[float, list, object]:
    """Wall time of the sweep; a cluster is started only when some job is not cached."""
    start = time.perf_counter()
    groups, report = iris.run_study(dataclasses.replace(cfg, scheduler="local", n_workers=workers), progress=True)
    return time.perf_counter() - start, groups, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default", choices=runner.PROFILES)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-seeds", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--retrain-steps", type=int, default=None)
    args = ap.parse_args()
    if args.workers < 2:
        ap.error(f"--workers={args.workers} is not allowed; it must be at least 2 (it is compared with 1)")
    overrides = {"n_seeds": args.n_seeds, "train_steps": args.train_steps, "retrain_steps": args.retrain_steps}

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        base = config(args.profile, {**overrides, "use_cache": True})
        one_cfg = dataclasses.replace(base, cache_dir=os.path.join(tmp, "one"))
        many_cfg = dataclasses.replace(base, cache_dir=os.path.join(tmp, "many"))
        jobs = len(iris.architectures(base))
        print(
            f"Iris '{args.profile}' grid: {jobs} architecture jobs, {base.n_seeds} seeds x 2 weight-decay settings each, "
            f"{base.train_steps} training + {base.retrain_steps} retraining steps; "
            f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        )
        t_one, g_one, r_one = timed_sweep(one_cfg, 1)
        t_many, g_many, r_many = timed_sweep(many_cfg, args.workers)
        t_warm, g_warm, r_warm = timed_sweep(many_cfg, args.workers)

    same = all(torch.equal(a, b) for a, b in zip(numbers(g_one), numbers(g_many), strict=True))
    warm_same = all(torch.equal(a, b) for a, b in zip(numbers(g_many), numbers(g_warm), strict=True))
    print(f"  1 worker            : {t_one:8.1f} s   ({r_one.summary()})")
    print(f"  {args.workers} workers           : {t_many:8.1f} s   ({r_many.summary()})")
    print(f"  {args.workers} workers, warm cache: {t_warm:8.3f} s   ({r_warm.summary()})")
    print(f"  speed-up, {args.workers} vs 1 workers : {t_one / t_many:8.2f}x")
    print(f"  warm cache vs cold  : {t_many / t_warm:8.1f}x faster")
    print(
        f"  same bits on 1 and {args.workers} workers: {'yes' if same else 'NO'}; "
        f"warm cache returns the same bits: {'yes' if warm_same else 'NO'}"
    )


if __name__ == "__main__":
    main()
