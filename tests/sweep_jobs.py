"""Job functions for the sweep tests: module-level so Dask worker processes can import them."""

import os
import time

import torch

from fragile import Objective, TrainSpec, build_model, fit, synthetic_classification


def train_small(seed: int, width: int, steps: int, sleep: float = 0.0) -> dict:
    """Train a tiny MLP; its final loss is a deterministic function of the arguments."""
    if sleep:
        time.sleep(sleep)
    torch.set_num_threads(1)
    data = synthetic_classification(30, num_features=3, num_classes=3, seed=seed)
    objective = Objective(build_model("mlp", seed=seed, in_features=3, num_classes=3, depth=1, width=width), 0.01)
    res = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.3, steps=steps), progress=False)
    return {"loss": float(res.losses[-1, 0]), "params": res.params[0], "pid": os.getpid()}


def fail_if(seed: int, bad: int) -> dict:
    if seed == bad:
        raise ValueError(f"seed {seed} is the bad one")
    return {"seed": seed}


def die_once(marker: str, value: int) -> dict:
    """Kill the worker process the first time it runs (``marker`` records that it did)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return {"value": value, "pid": os.getpid()}


def always_die() -> dict:
    os._exit(1)


def sleep_span(index: int, seconds: float) -> dict:
    """When the job ran: to see whether two jobs overlapped."""
    start = time.time()
    time.sleep(seconds)
    return {"start": start, "end": time.time()}
