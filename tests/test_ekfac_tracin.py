"""EK-FAC and TracIn estimators, and the checkpoints of fit(), against computations that do not use them.

EK-FAC: its corrected eigenvalues must be the diagonal of the explicit Gauss–Newton block of each layer
(built here from per-example Jacobians) in the Kronecker eigenbasis; its K-FAC factors must match hand
formulas; its inverse must invert the explicit block-diagonal EK-FAC matrix; and its influences must track
the exact ones. TracIn: grad_dot at one checkpoint, a hand loop of autograd dot products at several, and the
first-order conservation law of full-batch gradient descent.
"""

import pytest
import torch
from brute_force import newton_minimise
from torch import nn

from fragile import Objective, TrainSpec, build_model, fit, load_iris, make_estimator, synthetic_classification
from fragile.errors import InvalidArgumentError, SingularSystemError

DAMPING = 0.05


# -- independent references -----------------------------------------------------------------------
def _ggn(objective, theta, x):
    """Explicit Gauss–Newton matrix of the mean cross-entropy (no regulariser): mean of Jᵀ(diag p − ppᵀ)J."""
    jac = torch.func.vmap(torch.func.jacrev(lambda t, xi: objective.logits(t, xi.unsqueeze(0))[0]), in_dims=(None, 0))(theta, x)
    p = torch.softmax(objective.logits(theta, x), dim=-1)
    hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nkp,nkl,nlq->pq", jac, hz, jac) / x.shape[0]


def _block_index(f):
    """Indices into θ of a layer's [W | b] block, read row-major (the vec convention of fragile.estimators.ekfac)."""
    idx = torch.arange(f.weight_slice.start, f.weight_slice.stop).reshape(f.out_features, -1)
    if f.bias_slice is not None:
        idx = torch.cat([idx, torch.arange(f.bias_slice.start, f.bias_slice.stop)[:, None]], dim=1)
    return idx.reshape(-1)


def _explicit_ekfac(est):
    """The damped EK-FAC matrix, p×p, block-diagonal over layers: Q diag(Λ + wd + λ) Qᵀ with Q = Q_S ⊗ Q_A."""
    m = torch.zeros(est.p, est.p, dtype=torch.float64)
    for f in est.factors.values():
        i = _block_index(f)
        q = torch.kron(f.Q_S, f.Q_A)
        m[i[:, None], i] = q @ torch.diag(f.eigenvalues.reshape(-1) + est.objective.weight_decay + est.damping) @ q.T
    return m


def _pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _scaled_error(a, ref):
    """‖αa − ref‖/‖ref‖ at the best scalar α: how far a is from ref up to scale (rankings ignore scale)."""
    alpha = (a * ref).sum() / (a * a).sum()
    return float((alpha * a - ref).norm() / ref.norm())


def _rel(a, ref):
    return float((a - ref).norm() / ref.norm())


# -- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lbfgs_mlp():
    """The data and model of conftest's mlp_problem (tanh MLP, weight decay 0.01), minimised by L-BFGS: seconds, not 1500
    GD steps.
    """
    data = synthetic_classification(30, num_features=3, num_classes=3, noise=1.5, seed=2)
    model = build_model("mlp", seed=0, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.01)
    theta = objective.initial_params().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], max_iter=1000, tolerance_grad=1e-9, tolerance_change=0, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = objective.train_loss(theta, data.x, data.y)
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    assert float(objective.grad(theta, data.x, data.y).norm()) < 1e-7
    return objective, theta, data


def _conv_net():
    """Padding, stride, dilation, a layer without bias and an in-place activation after a layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, dilation=2, bias=False),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        ).double()


def _images(n, shape, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def _case(name):
    if name in ("mlp", "mlp_last_layer"):
        data = synthetic_classification(13, num_features=4, num_classes=3, seed=2)
        model = build_model("mlp", seed=0, in_features=4, num_classes=3, depth=2, width=5, activation="tanh")
        return Objective(model, 0.01, trainable=("net.4",) if name == "mlp_last_layer" else None), data.x, data.y
    if name == "conv":
        return Objective(_conv_net(), 0.01), *_images(11, (2, 7, 7), 3, seed=1)
    model = build_model("koh_liang_cnn", seed=0, channels=2, num_classes=3)  # 22×22 is the smallest input its strides take
    return Objective(model, 0.01), *_images(6, (1, 22, 22), 3, seed=2)


# -- EK-FAC ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "mlp_last_layer", "conv", "koh_liang_cnn"])
def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_eigenbasis(name):
    objective, x, y = _case(name)
    theta = objective.initial_params() * 1.5  # away from zero biases, so that every column is exercised
    est = make_estimator("ekfac", objective, theta, x, y, damping=0.1, data_chunk=4, progress=False).prepare()
    ggn = _ggn(objective, theta, x)
    assert sum(f.out_features * f.in_features for f in est.factors.values()) == objective.num_params
    for f in est.factors.values():
        i = _block_index(f)
        q = torch.kron(f.Q_S, f.Q_A)
        diag = torch.diagonal(q.T @ ggn[i][:, i] @ q).reshape(f.out_features, f.in_features)
        err = float((diag - f.eigenvalues).abs().max())
        assert err < 1e-10 * max(1.0, float(diag.abs().max())), f"{name} layer {f.name}: max |diag − Λ| = {err:.3g}"


def test_kfac_factors_match_hand_formulas_for_linear_layers():
    data = synthetic_classification(17, num_features=3, num_classes=4, seed=5)
    model = build_model("mlp", seed=1, in_features=3, num_classes=4, depth=1, width=5, activation="tanh")
    objective = Objective(model, 0.0)
    theta = objective.initial_params()
    est = make_estimator("ekfac", objective, theta, data.x, data.y, damping=0.1, data_chunk=5, progress=False).prepare()
    w = objective.unflatten(theta)
    ones = torch.ones(len(data.x), 1, dtype=torch.float64)
    hidden = torch.tanh(data.x @ w["net.0.weight"].T + w["net.0.bias"])
    p = torch.softmax(hidden @ w["net.2.weight"].T + w["net.2.bias"], dim=-1)
    fisher_z = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # Σ_c p_c (p − e_c)(p − e_c)ᵀ
    # Read-out layer: ā = [h, 1], g = p − e_c.
    a_out = torch.cat([hidden, ones], dim=1)
    torch.testing.assert_close(est.factors["net.2"].A, a_out.T @ a_out / len(a_out), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(est.factors["net.2"].S, fisher_z.mean(0), rtol=1e-12, atol=1e-14)
    # Hidden layer: ā = [x, 1], g = diag(1 − h²) W₂ᵀ (p − e_c).
    a_in = torch.cat([data.x, ones], dim=1)
    back = (1 - hidden**2)[:, :, None] * w["net.2.weight"].T  # (n, width, classes)
    torch.testing.assert_close(est.factors["net.0"].A, a_in.T @ a_in / len(a_in), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(est.factors["net.0"].S, (back @ fisher_z @ back.transpose(1, 2)).mean(0), rtol=1e-12, atol=1e-14)
    for f in est.factors.values():
        torch.testing.assert_close(f.Q_A @ torch.diag(f.eigvals_A) @ f.Q_A.T, f.A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.Q_S @ torch.diag(f.eigvals_S) @ f.Q_S.T, f.S, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_ekfac_inverse_hvp_inverts_the_explicit_ekfac_matrix(name):
    objective, x, y = _case(name)
    theta = objective.initial_params()
    est = make_estimator("ekfac", objective, theta, x, y, damping=DAMPING, progress=False, vector_chunk=2)
    vs = torch.randn(3, objective.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs, residuals = est.inverse_hvps(vs)
    m = _explicit_ekfac(est)
    torch.testing.assert_close(xs @ m, vs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est.inverse_hvp(vs[1]).x, xs[1], rtol=1e-12, atol=1e-14)
    # The residual is against the true damped Hessian, not the EK-FAC matrix it inverts.
    h = torch.func.hessian(objective.train_loss)(theta, x, y) + DAMPING * torch.eye(objective.num_params, dtype=torch.float64)
    torch.testing.assert_close(residuals, (xs @ h - vs).norm(dim=1) / vs.norm(dim=1), rtol=1e-8, atol=1e-12)
    assert float(residuals.min()) > 1e-3 and est.residual_by_design


def test_ekfac_tracks_exact_influence_on_softmax_regression():
    """One linear layer: the Hessian is the Gauss–Newton matrix, so only the EK-FAC approximation itself
    (the off-diagonal of the Hessian in the Kronecker eigenbasis, dropped) separates the two."""
    data = load_iris()
    objective = Objective(build_model("mlp", seed=0, in_features=4, num_classes=3, depth=0), weight_decay=0.01)
    theta = newton_minimise(objective, objective.initial_params(), data.x, data.y)
    res = {
        m: make_estimator(m, objective, theta, data.x, data.y, progress=False).influences(data.x[:10], data.y[:10]).predicted
        for m in ("exact", "ekfac", "grad_dot")
    }
    r_ek, r_gd = _pearson(res["ekfac"], res["exact"]), _pearson(res["grad_dot"], res["exact"])
    assert r_ek > 0.95, f"Pearson(ekfac, exact) = {r_ek:.4f} over 10 test × 150 training points (grad_dot: {r_gd:.4f})"
    assert r_ek > r_gd + 0.05, f"Pearson ekfac {r_ek:.4f} vs grad_dot {r_gd:.4f}"
    assert _scaled_error(res["ekfac"], res["exact"]) < 0.5 * _scaled_error(res["grad_dot"], res["exact"])


def test_ekfac_is_closer_to_exact_than_grad_dot_on_an_mlp(lbfgs_mlp):
    objective, theta, data = lbfgs_mlp
    res = {
        m: make_estimator(m, objective, theta, data.x, data.y, damping=DAMPING, progress=False).influences(data.x[:5], data.y[:5])
        for m in ("exact", "ekfac", "grad_dot")
    }
    ex = res["exact"].predicted
    ek, gd = res["ekfac"].predicted, res["grad_dot"].predicted
    msg = (
        f"up to scale: ekfac {_scaled_error(ek, ex):.3f} vs grad_dot {_scaled_error(gd, ex):.3f}; Pearson: ekfac "
        f"{_pearson(ek, ex):.4f} vs grad_dot {_pearson(gd, ex):.4f}; raw relative error: ekfac {_rel(ek, ex):.3f} vs "
        f"grad_dot {_rel(gd, ex):.3f}"
    )
    # Compared up to scale: EK-FAC's block-diagonal matrix overshoots the magnitude (as the block-diagonal Gauss–Newton
    # matrix does), which a ranking or correlation, the paper's measures, ignores.
    assert _scaled_error(ek, ex) < 0.8 * _scaled_error(gd, ex), msg
    assert _pearson(ek, ex) > _pearson(gd, ex) + 0.03, msg


def test_ekfac_rejects_unsupported_parameters_before_any_work():
    calls = []
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    objective = Objective(model)
    x, y = _images(4, (1, 5, 5), 3, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"'1\.weight'.*GroupNorm.*nn\.Linear and nn\.Conv2d"):
        make_estimator("ekfac", objective, objective.initial_params(), x, y, damping=0.1, progress=False)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    with pytest.raises(InvalidArgumentError, match=r"'0\.weight'.*groups=2"):
        make_estimator("ekfac", Objective(grouped), Objective(grouped).initial_params(), *_images(4, (2, 5, 5), 3, seed=0))
    assert calls == [], "the model ran before the error"


class _Twice(nn.Module):
    """One Linear applied twice (shared weights): its per-example gradient is not g āᵀ of a single call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_ekfac_refuses_a_layer_that_runs_twice():
    objective = Objective(_Twice().double(), 0.01)
    data = synthetic_classification(6, num_features=3, num_classes=3, seed=0)
    est = make_estimator("ekfac", objective, objective.initial_params(), data.x, data.y, damping=0.1, progress=False)
    with pytest.raises(InvalidArgumentError, match="'lin' ran twice"):
        est.prepare()


def test_ekfac_bad_options_and_singular_matrix_are_reported():
    objective, x, y = _case("mlp")
    theta = objective.initial_params()
    with pytest.raises(InvalidArgumentError, match="vector_chunk=0"):
        make_estimator("ekfac", objective, theta, x, y, damping=0.1, vector_chunk=0)
    with pytest.raises(InvalidArgumentError, match=r"unknown option.*'rank'.*ekfac"):
        make_estimator("ekfac", objective, theta, x, y, damping=0.1, rank=3)
    # Softmax output gradients sum to zero over classes: without weight decay or damping the read-out block is singular.
    undamped = make_estimator("ekfac", objective.with_weight_decay(0.0), theta, x, y, damping=0.0, progress=False)
    with pytest.raises(SingularSystemError, match=r"singular in layer 'net\.4'.*increase damping"):
        undamped.prepare()


# -- TracIn ---------------------------------------------------------------------------------------
def test_tracin_at_one_checkpoint_is_grad_dot_exactly(lbfgs_mlp):
    objective, theta, data = lbfgs_mlp
    kw = {"damping": DAMPING, "progress": False, "grad_chunk": 7}
    dot = make_estimator("grad_dot", objective, theta, data.x, data.y, **kw).influences(data.x[:4], data.y[:4])
    tracin = make_estimator("tracin", objective, theta, data.x, data.y, checkpoints=theta[None], **kw)
    res = tracin.influences(data.x[:4], data.y[:4])
    assert torch.equal(res.predicted, dot.predicted)
    assert torch.equal(res.train_idxs, dot.train_idxs) and res.method == "tracin"
    assert torch.isnan(res.residuals).all() and tracin.residual_by_design
    assert res.details == {"num_checkpoints": 1, "lrs": [1.0]}
    # TracIn solves no system: it has no inverse HVP and no parameter change to predict, rather than methods that raise.
    assert not any(hasattr(tracin, m) for m in ("hvp", "inverse_hvp", "inverse_hvps", "predicted_param_changes"))


def test_tracin_over_checkpoints_is_the_sum_of_autograd_dot_products(lbfgs_mlp):
    objective, theta, data = lbfgs_mlp
    wd, n = objective.weight_decay, len(data.x)
    checkpoints = torch.stack([objective.initial_params(), 0.5 * (objective.initial_params() + theta), theta])
    lrs = [0.3, 1.0, 2.5]
    train_idxs = [0, 3, 7, 29]
    res = make_estimator(
        "tracin",
        objective,
        theta,
        data.x,
        data.y,
        checkpoints=checkpoints,
        lrs=torch.tensor(lrs, dtype=torch.float64),
        progress=False,
    ).influences(data.x[:3], data.y[:3], train_idxs=train_idxs)

    def grad_of(params, xi, yi, share):
        params = params.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(objective.logits(params, xi[None]), yi[None])
        if share:  # the training point's share of the objective includes the regulariser
            loss = loss + 0.5 * wd * (params * params).sum()
        return torch.autograd.grad(loss, params)[0]

    expected = torch.zeros(3, len(train_idxs), dtype=torch.float64)
    for ck, lr in zip(checkpoints, lrs):
        for t in range(3):
            g_test = grad_of(ck, data.x[t], data.y[t], share=False)
            for j, i in enumerate(train_idxs):
                expected[t, j] += lr * float(g_test @ grad_of(ck, data.x[i], data.y[i], share=True)) / n
    torch.testing.assert_close(res.predicted, expected, rtol=1e-12, atol=1e-15)


def test_tracin_over_every_gd_step_conserves_the_test_loss_change_to_first_order():
    """Σ_i TracIn(z_i) = L_test(θ_0) − L_test(θ_T) + O(lr²) for full-batch GD with checkpoints before each step.

    Exact to first order only with each point's share of the objective, ℓ_i + (wd/2)‖θ‖², and the 1/n: the
    GD step is −lr·(1/n)Σ_i∇L(z_i). So halving lr (same steps) must cut the gap by about 4; a convention off at
    first order would leave a gap linear in lr (dropping the regulariser's share, computed below, would leave one
    far larger than the gap measured).
    """
    data = synthetic_classification(20, num_features=3, num_classes=3, noise=1.0, seed=3)
    model = build_model("mlp", seed=2, in_features=3, num_classes=3, depth=1, width=4, activation="tanh")
    objective = Objective(model, weight_decay=0.1)
    theta0 = objective.initial_params() * 3.0  # a large ‖θ‖ so that the regulariser's share is far from negligible
    test = synthetic_classification(4, num_features=3, num_classes=3, noise=1.0, seed=9)
    x_test, y_test = test.x, test.y
    steps = 20
    gaps, changes = [], []
    for lr in (0.02, 0.01):
        run = fit(objective, theta0, data.x, data.y, TrainSpec(lr=lr, steps=steps), progress=False, checkpoint_every=1)
        before = run.checkpoints[:-1, 0]  # θ_0 … θ_{T−1}
        est = make_estimator(
            "tracin", objective, run.params[0], data.x, data.y, checkpoints=before, lrs=[lr] * steps, progress=False
        )
        total = est.influences(x_test, y_test).predicted.sum(dim=1)
        change = objective.sample_losses(theta0, x_test, y_test) - objective.sample_losses(run.params[0], x_test, y_test)
        gaps.append((total - change).abs())
        changes.append(change)
        if lr == 0.01:
            g_test = torch.stack([objective.sample_grads(ck, x_test, y_test) for ck in before])  # (T, n_test, p)
            decay_share = lr * objective.weight_decay * torch.einsum("ktp,kp->t", g_test, before)
    # Over the test points together: one point's second-order term can nearly cancel, leaving its third-order one.
    ratio = float(gaps[0].norm() / gaps[1].norm())
    msg = f"gaps at lr 0.02 {gaps[0].tolist()}, at 0.01 {gaps[1].tolist()}; changes {changes[1].tolist()}"
    assert bool((gaps[1] < 0.02 * changes[1].abs()).all()), msg
    assert 3.5 < ratio < 4.5, f"gap ratio {ratio:.3f}; " + msg
    assert float(decay_share.norm()) > 10 * float(gaps[1].norm()), f"regulariser share {decay_share.tolist()}; " + msg


@pytest.mark.parametrize(
    "options,match",
    [
        ({}, "checkpoints is required"),
        ({"checkpoints": torch.zeros(2, 5, dtype=torch.float64)}, r"checkpoints has shape \(2, 5\)"),
        ({"checkpoints": torch.zeros(0, 31, dtype=torch.float64)}, r"checkpoints has shape \(0, 31\)"),
        ({"checkpoints": "theta"}, "checkpoints has shape str"),
        ({"checkpoints": torch.zeros(2, 31, dtype=torch.float64), "lrs": [0.1]}, "lrs has 1 values"),
        ({"checkpoints": torch.zeros(2, 31, dtype=torch.float64), "lrs": [0.1, -1.0]}, "lrs has 2 values"),
        ({"checkpoints": torch.zeros(2, 31, dtype=torch.float64), "lrs": "fast"}, "lrs="),
        ({"checkpoints": torch.full((1, 31), float("nan"), dtype=torch.float64)}, "non-finite"),
    ],
)
def test_tracin_bad_options_name_the_option(lbfgs_mlp, options, match):
    objective, theta, data = lbfgs_mlp
    assert objective.num_params == 31
    with pytest.raises(InvalidArgumentError, match=match):
        make_estimator("tracin", objective, theta, data.x, data.y, **options)


# -- fit(checkpoint_every) ------------------------------------------------------------------------
def test_fit_checkpoints_are_the_parameters_shorter_fits_reach():
    data = synthetic_classification(24, num_features=3, num_classes=2, seed=4)
    objective = Objective(build_model("mlp", seed=1, in_features=3, num_classes=2, depth=1, width=3), weight_decay=0.01)
    theta0 = torch.stack([objective.initial_params(), objective.initial_params() + 0.1])  # a stack of K=2
    spec = TrainSpec("sgd", lr=0.1, steps=7, batch_size=5, momentum=0.9, seed=2)
    res = fit(objective, theta0, data.x, data.y, spec, progress=False, checkpoint_every=3)
    plain = fit(objective, theta0, data.x, data.y, spec, progress=False)
    assert res.checkpoint_steps == [0, 3, 6, 7]
    assert res.checkpoints.shape == (4, 2, objective.num_params)
    assert plain.checkpoints is None and plain.checkpoint_steps is None
    assert torch.equal(res.params, plain.params) and torch.equal(res.losses, plain.losses)
    for ck, steps in zip(res.checkpoints, res.checkpoint_steps):
        shorter = fit(objective, theta0, data.x, data.y, spec.replace(steps=steps), progress=False)
        assert torch.equal(ck, shorter.params), f"checkpoint at step {steps}"


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_fit_rejects_bad_checkpoint_every_before_training(bad, monkeypatch):
    objective = Objective(build_model("mlp", seed=1, in_features=3, num_classes=2, depth=0))
    data = synthetic_classification(6, num_features=3, num_classes=2, seed=4)

    def no_work(*_a, **_k):
        raise AssertionError("training started")

    monkeypatch.setattr(objective, "stacked_train_losses", no_work)
    with pytest.raises(InvalidArgumentError, match="checkpoint_every="):
        fit(objective, objective.initial_params(), data.x, data.y, TrainSpec(steps=3), progress=False, checkpoint_every=bad)
