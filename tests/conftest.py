import pytest
from brute_force import newton_minimise

from fragile import Objective, TrainSpec, build_model, fit, synthetic_classification


@pytest.fixture(scope="session")
def logistic_problem():
    """Convex: L2-regularised multinomial logistic regression trained to (numerical) convergence by Newton."""
    data = synthetic_classification(150, num_features=3, num_classes=3, noise=1.5, seed=1)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=0)
    objective = Objective(model, weight_decay=0.01)
    theta = newton_minimise(objective, objective.initial_params(), data.x, data.y)
    return objective, theta, data


@pytest.fixture(scope="session")
def mlp_problem():
    """Non-convex: a 1-hidden-layer tanh MLP trained by gradient descent (weight decay 0.01)."""
    data = synthetic_classification(30, num_features=3, num_classes=3, noise=1.5, seed=2)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(lr=0.5, steps=1500), progress=False).params[0]
    return objective, theta, data
