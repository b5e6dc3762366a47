"""Job functions for the sweep tests: module-level so Dask worker processes can import them."""

import os
import time
from pathlib import Path

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


def train_small_after_gate(seed: int, width: int, steps: int, gate: str, first_gated: int) -> dict:
    """:func:`train_small`, except that a job with ``seed >= first_gated`` first waits until the file ``gate``
    exists. A sweep run in-process, in order, and killed while it waits has finished exactly the jobs below
    ``first_gated``: the kill lands midway by construction, not by timing."""
    while seed >= first_gated and not os.path.exists(gate):
        time.sleep(0.02)
    return train_small(seed, width, steps)


def meet(index: int, folder: str, others: int, patience_s: float = 300.0) -> dict:
    """Announce this job in ``folder``, then wait until ``others`` other jobs have announced themselves too:
    ``met`` is True only if they all ran at the same time as this one. ``patience_s`` is a guard against a
    hang (a job that never meets the others returns ``met=False`` then), not a measure of speed."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"job-{index}").touch()
    give_up = time.monotonic() + patience_s
    while len(list(Path(folder).glob("job-*"))) < others + 1:
        if time.monotonic() > give_up:
            return {"index": index, "met": False}
        time.sleep(0.02)
    return {"index": index, "met": True}


def square(x: int) -> dict:
    return {"square": x * x}


def computed_once(folder: str, value: int) -> dict:
    """Leave one ``computed-<pid>`` file per time it computes, then wait until the file ``gate`` in ``folder``
    exists: a test holds this job in flight while a second run of it starts."""
    (Path(folder) / f"computed-{os.getpid()}").touch()
    while not (Path(folder) / "gate").exists():
        time.sleep(0.02)
    return {"value": value}
