"""Every computation on a CUDA device agrees with the same computation on the CPU (the reference), in float64.

Run where a GPU exists: ``pytest -m gpu``. Tolerances are round-off of a different summation order, not more.
"""

import pytest
import torch

from fragile import Objective, TrainSpec, build_model, fit, synthetic_classification
from fragile.core.ground_truth import loo_retrain
from fragile.estimators import make_estimator
from fragile.run.devices import resolve_device

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def problem():
    data = synthetic_classification(40, num_features=3, num_classes=3, noise=1.5, seed=2)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.5, steps=800), progress=False).params[0]
    return model, objective, theta, data


def on_cuda(model, data):
    import copy

    return Objective(copy.deepcopy(model).to(CUDA), 0.01), data.x.to(CUDA), data.y.to(CUDA)


def test_auto_picks_the_gpu():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_training_on_the_gpu_matches_the_cpu(problem):
    model, objective, theta, data = problem
    spec = TrainSpec("adam", lr=0.01, steps=200, batch_size=10, seed=3)
    cpu = fit(objective, objective.initial_params(), data.x, data.y, spec, progress=False)
    obj_g, xg, yg = on_cuda(model, data)
    gpu = fit(obj_g, obj_g.initial_params(), xg, yg, spec, progress=False)
    assert gpu.params.device.type == "cuda"
    torch.testing.assert_close(gpu.params.cpu(), cpu.params, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("exact", {}),
        ("cg", {"rtol": 1e-10, "max_iter": 500}),
        ("lissa", {"depth": 400, "seed": 0}),
        ("arnoldi", {"rank": 10}),
    ],
)
def test_every_estimator_on_the_gpu_matches_the_cpu(problem, method, kwargs):
    model, objective, theta, data = problem
    cpu = make_estimator(method, objective, theta, data.x, data.y, damping=0.01, progress=False, **kwargs).influences(
        data.x[:3], data.y[:3]
    )
    obj_g, xg, yg = on_cuda(model, data)
    gpu = make_estimator(method, obj_g, theta.to(CUDA), xg, yg, damping=0.01, progress=False, **kwargs).influences(xg[:3], yg[:3])
    assert gpu.predicted.device.type == "cpu"  # results come back as small CPU tensors
    torch.testing.assert_close(gpu.predicted, cpu.predicted, rtol=1e-6, atol=1e-10)


def test_leave_one_out_on_the_gpu_matches_the_cpu(problem):
    model, objective, theta, data = problem
    spec = TrainSpec("adam", lr=0.01, steps=50, batch_size=10, seed=4)
    cpu = loo_retrain(objective, theta, data.x, data.y, [0, 5, 7], spec, data.x[:2], data.y[:2], progress=False)
    obj_g, xg, yg = on_cuda(model, data)
    gpu = loo_retrain(obj_g, theta.to(CUDA), xg, yg, [0, 5, 7], spec, xg[:2], yg[:2], progress=False)
    torch.testing.assert_close(gpu.actual, cpu.actual, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(gpu.drift, cpu.drift, rtol=1e-6, atol=1e-10)


def test_a_table1_job_on_the_gpu_gives_the_cpus_numbers():
    import numpy as np

    from fragile.chapters.table1_protocol import Table1Config, run_model

    cfg = Table1Config(
        device="cpu",
        mnist_architectures=("lenet",),
        cifar10_architectures=(),
        dtype="float64",
        n_train=20,
        n_test=30,
        batch_size=10,
        train_steps=40,
        top_k=4,
        lissa_depth=20,
        lissa_batch_size=10,
        cg_max_iter=10,
        arnoldi_rank=5,
        use_cache=False,
        scheduler="in-process",
    )
    cpu = run_model(cfg, "mnist", "lenet", 0.001, 0)
    gpu = run_model(cfg, "mnist", "lenet", 0.001, 0, device="cuda")
    assert gpu.network.device.startswith("cuda") and cpu.network.device == "cpu"
    np.testing.assert_array_equal(gpu.test_points, cpu.test_points)
    np.testing.assert_allclose(gpu.estimators["arnoldi"].predicted, cpu.estimators["arnoldi"].predicted, rtol=1e-5, atol=1e-9)
    for g, c in zip(gpu.per_test_point, cpu.per_test_point, strict=True):
        np.testing.assert_array_equal(g.chosen, c.chosen)
        np.testing.assert_allclose(g.actual, c.actual, rtol=1e-5, atol=1e-9)
