"""What one model of the Table 1 chapter's `paper` profile costs, per architecture, on this machine's device.

Measures, side by side in one run and after warm-up, the unit costs the protocol is made of (an Adam step of 128
images, an HVP over 1,024 images and over all offline training images, a step of a stack of 8 leave-one-out models,
per-example gradients), then multiplies them by the counts of the `paper` profile (MnistCifar10Config defaults:
20,000 training steps, LiSSA depth 5,000 on 1,024 images for 2 test points, CG up to 200 and Arnoldi 2·100 full-data
HVPs, 81 leave-one-out models of 1,200 steps) with full-data costs scaled linearly to 60,000 images. The result is an
estimate of the time per model, printed beside the measured unit costs; the chapter's provenance records a real run.

    python benchmarks/table1_costs.py [--device auto] [--architectures small_cnn lenet vgg11 resnet18 resnet50]
"""

from __future__ import annotations

import argparse
import time

import torch

from fragile.chapters.mnist_cifar10 import MnistCifar10Config
from fragile.chapters.table1_protocol import build_network, load_data, model_inputs
from fragile.core.curvature import hvp
from fragile.core.objective import Objective
from fragile.core.train import TrainSpec, fit
from fragile.run.devices import resolve_device


def timed(fn, device, repeats=3):
    fn()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--architectures", nargs="+", default=["small_cnn", "lenet", "vgg11", "resnet18", "resnet50"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--json", default="", help="also write the measurements here (the chapter shows them)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    paper = MnistCifar10Config()
    cfg = MnistCifar10Config(device=str(device), width=args.width, n_train=0, n_test=0)
    data = load_data(cfg, "mnist")
    n_offline, n_paper = len(data.train), 60000
    print(
        f"device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; torch {torch.__version__}; width {args.width}; {n_offline} offline MNIST digits, costs scaled to {n_paper:,}"
    )
    rows = []
    header = (
        "architecture",
        "params",
        "Adam step 128 (ms)",
        "HVP 1024 (ms)",
        f"HVP {n_offline} (ms)",
        "LOO 8-stack step (ms)",
        "grads 512 (ms)",
        "est. hours per model",
    )
    print(" | ".join(header))
    for arch in args.architectures:
        num_params, (step, hvp_small, hvp_full, loo, grads) = unit_costs(cfg, arch, data, device)
        full_paper = hvp_full * n_paper / n_offline
        seconds = (
            paper.train_steps * step
            + 50 * full_paper  # power iteration for LiSSA's scale
            + 2 * paper.lissa_depth * paper.lissa_repeats * hvp_small  # LiSSA, two test points
            + 2 * paper.cg_max_iter * full_paper  # CG at its cap, two test points
            + 2 * paper.arnoldi_rank * full_paper  # Arnoldi
            + 3 * n_paper / 512 * grads  # every training gradient, three estimators
            + (2 * paper.top_k + 1) / 8 * paper.retrain_steps * loo
        )  # leave-one-out stacks of 8
        rows.append(
            {
                "architecture": arch,
                "params": num_params,
                "adam_step_s": step,
                "loo_stack8_step_s": loo,
                "hours_per_model": seconds / 3600,
            }
        )
        print(
            " | ".join(
                [
                    arch,
                    f"{num_params:,}",
                    f"{step * 1e3:.1f}",
                    f"{hvp_small * 1e3:.1f}",
                    f"{hvp_full * 1e3:.0f}",
                    f"{loo * 1e3:.1f}",
                    f"{grads * 1e3:.1f}",
                    f"{seconds / 3600:.2f}",
                ]
            ),
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the architecture's tensors died with unit_costs' frame
    if args.json:
        write_json(args.json, device, rows)


def unit_costs(cfg: MnistCifar10Config, arch: str, data, device: torch.device) -> tuple[int, tuple[float, ...]]:
    """One architecture's parameter count and unit costs in seconds: an Adam step of 128 images, an HVP over 1,024
    images and over all of them, a step of a stack of 8 leave-one-out models, 512 per-example gradients."""
    x = model_inputs(arch, "mnist", data.train.x).to(device)
    y = data.train.y.to(device)
    objective = Objective(build_network(cfg, arch, "mnist", 0).to(device), 0.001)
    theta = objective.initial_params()
    spec = TrainSpec("adam", lr=1e-3, steps=10, batch_size=128, seed=0)
    step = timed(lambda: fit(objective, theta, x, y, spec, progress=False), device) / spec.steps
    v = torch.randn(objective.num_params, generator=torch.Generator().manual_seed(0)).to(device, theta.dtype)
    hvp_small = timed(lambda: hvp(objective, theta, x[:1024], y[:1024], v, data_chunk=256), device)
    hvp_full = timed(lambda: hvp(objective, theta, x, y, v, data_chunk=256), device, repeats=1)

    def loo_stack_step() -> float:
        """A step of 8 leave-one-out models trained as one stack (freed on return, before the gradients)."""
        stack = theta.expand(8, -1).contiguous()
        weights = torch.ones(8, len(x), dtype=theta.dtype, device=device)
        return timed(lambda: fit(objective, stack, x, y, spec, weights=weights, progress=False), device) / spec.steps

    try:
        loo = loo_stack_step()
    except torch.OutOfMemoryError:  # reported, and the estimate falls back to one model at a time
        loo = 8 * step
        print(f"{arch}: a stack of 8 does not fit in memory; leave-one-out estimated one model at a time", flush=True)
    grads = timed(lambda: objective.point_grads(theta, x[:512], y[:512], 256), device)
    return objective.num_params, (step, hvp_small, hvp_full, loo, grads)


def write_json(path: str, device: torch.device, rows: list[dict]) -> None:
    import datetime
    import json

    from fragile.atomic import atomic_write_bytes

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    record = {
        "device": name,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "script": "benchmarks/table1_costs.py",
        "rows": rows,
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())


if __name__ == "__main__":
    main()
