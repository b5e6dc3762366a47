"""Leave-one-out retraining, sequential loop vs batched stack, measured side by side in one run.

The paper's Iris protocol: a 1-hidden-layer, width-5 ReLU MLP trained by full-batch gradient descent,
then 25 leave-one-out models (about 16.6 % of 149 points) warm-started from θ* for 7,500 steps each,
plus the drift control. Both versions train the same 26 models; the script checks they agree to
1e-5 relative (float64) and prints the speed-up. (The small-MNIST CNN is timed by exact_hessian.py.)

    python benchmarks/loo_batched.py [--steps 7500] [--points 25]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fragile import Objective, TrainSpec, build_model, fit, load_iris, loo_retrain, loo_retrain_sequential, make_estimator


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
    compare_loo(
        (objective, theta, xtr, ytr, remove, spec, xte, yte),
        f"Iris MLP (1x5 ReLU, p={objective.num_params}), {points} leave-one-out models + control, {steps} GD steps each",
        rtol=1e-5,
    )


def compare_loo(args: tuple, header: str, rtol: float) -> None:
    """Time ``loo_retrain`` (one stack) against ``loo_retrain_sequential`` on the same arguments, check
    their test losses agree to ``rtol`` relative, and print both times and the speed-up."""
    points = len(args[4])
    t0 = time.perf_counter()
    batched = loo_retrain(*args, chunk_size=points + 1, progress=False)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential = loo_retrain_sequential(*args, progress=False)
    t_seq = time.perf_counter() - t0
    rel = float(((batched.test_loss_removed - sequential.test_loss_removed).abs() / sequential.test_loss_removed.abs()).max())
    print(header)
    print(f"  sequential loop : {t_seq:8.2f} s")
    print(f"  batched stack   : {t_batched:8.2f} s")
    print(f"  speed-up        : {t_seq / t_batched:8.2f}x")
    print(f"  max relative difference of test losses: {rel:.2e} ({'OK' if rel < rtol else 'MISMATCH'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=7500, help="retraining steps per leave-one-out model (paper: 7,500)")
    ap.add_argument("--points", type=int, default=25, help="leave-one-out models (paper: 16.6%% of 149 = 25)")
    ap.add_argument("--train-steps", type=int, default=20000, help="GD steps to reach θ* (the ratio does not depend on it)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    iris_loo(args.steps, args.points, args.train_steps)


if __name__ == "__main__":
    main()
