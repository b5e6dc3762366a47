"""Leave-one-out retraining of the Iris networks: a sequential loop, the ``vmap`` stack and the feature-major stack
(:mod:`fragile.core.stacked_mlp`, what :class:`~fragile.Objective` uses for MLPs), measured side by side in one run.

The paper's Iris protocol: an MLP of width 5 trained by full-batch gradient descent, then leave-one-out models
(25, about 16.6 % of 149 points, plus the drift control; or a published-profile stack of 128) warm-started from θ*
and retrained for ``--steps`` steps each. Every version trains the same models; the script checks that they agree
(the two stacks to 1e-10 relative, the loop to 1e-5) and prints milliseconds per step and the speed-ups. The ``vmap``
stack is the same network behind a wrapper that is no chain of layers, so the objective evaluates it by ``vmap``
over ``functional_call``. Deep networks' retraining can amplify a rounding-level difference far past rounding (a
ReLU unit that flips on one example): where the stacks differ beyond 1e-10, the script retrains the ``vmap`` stack
from θ* perturbed by 1e-15 relative and calls the stacks consistent when they differ no more than that (ten times).
(The small-MNIST CNN's Hessian is timed by exact_hessian.py.)

    python benchmarks/loo_batched.py [--steps 2000] [--points 25] [--no-sequential]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from scipy.stats import spearmanr
from torch import nn

from fragile import Objective, TrainSpec, build_model, fit, load_iris, loo_retrain, loo_retrain_sequential, make_estimator
from fragile.run.allocator import keep_freed_memory


class Opaque(nn.Module):
    """The same network behind a wrapper that is no chain: the objective takes the ``vmap`` path for it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def iris_problem(depth: int, train_steps: int):
    data = load_iris()
    objective = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=depth, width=5), weight_decay=0.001)
    x, y = data.x, data.y
    theta = fit(objective, objective.initial_params(), x, y, TrainSpec(lr=0.1, steps=train_steps), progress=False).params[0]
    test = int(objective.sample_losses(theta, x, y).argmax())  # the highest-loss point becomes the test point
    keep = torch.arange(len(data)) != test
    xtr, ytr, xte, yte = x[keep], y[keep], x[test : test + 1], y[test : test + 1]
    theta = fit(objective, theta, xtr, ytr, TrainSpec(lr=0.1, steps=train_steps), progress=False).params[0]
    pred = make_estimator("exact", objective, theta, xtr, ytr, progress=False).influences(xte, yte).predicted[0]
    order = torch.argsort(pred.abs(), descending=True)
    return objective, theta, xtr, ytr, xte, yte, order


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def changes(loo) -> list[float]:
    """The leave-one-out change of the test loss, the ground truth influence is compared with."""
    return (loo.test_loss_removed[:, 0] - loo.test_loss_star[0]).tolist()


def compare(depth: int, points: int, steps: int, train_steps: int, sequential: bool) -> None:
    objective, theta, xtr, ytr, xte, yte, order = iris_problem(depth, train_steps)
    opaque = Objective(Opaque(objective.model), weight_decay=objective.weight_decay)
    assert objective._mlp is not None and opaque._mlp is None and opaque.num_params == objective.num_params
    spec = TrainSpec("gd", lr=0.1, steps=steps)
    remove = order[:points]
    models = points + 1
    feature, t_feature = timed(loo_retrain, objective, theta, xtr, ytr, remove, spec, xte, yte, chunk_size=models, progress=False)
    vmapped, t_vmap = timed(loo_retrain, opaque, theta, xtr, ytr, remove, spec, xte, yte, chunk_size=models, progress=False)
    print(
        f"Iris MLP depth {depth}, width 5 (p={objective.num_params}): {points} leave-one-out models + control, {steps} GD steps"
    )
    print(f"  vmap stack          : {t_vmap / steps * 1e3:7.3f} ms/step")
    print(f"  feature-major stack : {t_feature / steps * 1e3:7.3f} ms/step   speed-up {t_vmap / t_feature:5.2f}x")
    rel = relative(feature.test_loss_removed, vmapped.test_loss_removed)
    if rel < 1e-10:
        print(f"  stacks agree: max relative difference of test losses {rel:.1e} (OK)")
    else:
        # Is the gap the stack's, or does this retraining amplify any rounding-level difference? Perturb θ* instead.
        nudged = loo_retrain(opaque, theta * (1 + 1e-15), xtr, ytr, remove, spec, xte, yte, chunk_size=models, progress=False)
        floor = relative(nudged.test_loss_removed, vmapped.test_loss_removed)
        rho = spearmanr(changes(feature), changes(vmapped))[0]
        verdict = "OK: the retraining amplifies rounding" if rel < 10 * floor else "MISMATCH"
        print(
            f"  stacks differ by {rel:.1e} relative; the vmap stack from θ*·(1 + 1e-15) differs from itself by "
            f"{floor:.1e} ({verdict}); Spearman of the two stacks' loss changes {rho:.4f}"
        )
    if sequential:
        seq, t_seq = timed(loo_retrain_sequential, objective, theta, xtr, ytr, remove, spec, xte, yte, progress=False)
        rel = relative(feature.test_loss_removed, seq.test_loss_removed)
        print(f"  sequential loop     : {t_seq / steps * 1e3:7.3f} ms/step   stack speed-up {t_seq / t_feature:5.2f}x")
        print(f"  loop agrees: max relative difference {rel:.1e} ({'OK' if rel < 1e-5 else 'MISMATCH'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=2000, help="retraining steps per model (paper: 7,500; the ratios do not depend on it)"
    )
    ap.add_argument("--points", type=int, default=25, help="leave-one-out models (paper: 16.6%% of 149 = 25)")
    ap.add_argument("--train-steps", type=int, default=20000, help="GD steps to reach θ* (the ratios do not depend on it)")
    ap.add_argument("--no-sequential", action="store_true", help="leave out the sequential loop (the slowest)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)  # as every sweep job runs
    keep_freed_memory()  # as every sweep job runs: page faults on fresh allocations would dominate small steps
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, one thread")
    for depth in (1, 8):
        compare(depth, args.points, args.steps, args.train_steps, not args.no_sequential)
    print("published-profile stacks (127 models + control):")
    for depth in (1, 8):
        compare(depth, 127, args.steps // 4, args.train_steps, False)


if __name__ == "__main__":
    main()
