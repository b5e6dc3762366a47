"""The small-MNIST section's own logic: data, test-point choice, config checks, and that a model job's
numbers match independent computations (sequential leave-one-out retraining, a separately built estimator)."""

import numpy as np
import pytest
import torch
from brute_force import retrained_change
from data_roots import write_mnist_root

from fragile import Objective, TrainSpec, build_model, fit, make_estimator
from fragile.book.verdicts import Verdict
from fragile.chapters.results import Estimate, Fit
from fragile.chapters.small_mnist import SmallMnistConfig, SmallMnistResult, claims, load_data, model_jobs, run_model
from fragile.chapters.table1_protocol import PointResult, Retraining
from fragile.core.selection import choose_test_points
from fragile.errors import InvalidArgumentError

TINY = dict(
    n_train=20,
    n_test=50,
    weight_decays=(0.001, 0.1),
    lr=0.001,
    batch_size=10,
    train_steps=60,
    retrain_steps=8,
    n_test_points=2,
    top_k=4,
    band_k=4,
    random_k=4,
    cg_max_iter=60,
    lissa_depth=10,
    lissa_batch_size=10,
    arnoldi_rank=10,
    sweep_estimator="cg",
    scheduler="in-process",
    use_cache=False,
)


def test_test_points_run_from_the_highest_loss_to_the_median():
    losses = np.array([0.3, 5.0, 0.1, 2.0, 0.7, 0.2, 1.0])  # ranks: 5.0, 2.0, 1.0, 0.7 (median), 0.3, 0.2, 0.1
    assert choose_test_points(losses, 1).tolist() == [1]
    assert choose_test_points(losses, 2).tolist() == [1, 4]
    assert choose_test_points(losses, 4).tolist() == [1, 3, 6, 4]
    with pytest.raises(InvalidArgumentError, match="n_points"):
        choose_test_points(losses, 8)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"weight_decay": 0.05}, "weight_decay=0.05 is not allowed; it must be one of weight_decays"),
        ({"n_train": 55}, "n_train=55 is not allowed; it must be 0 .all. or a multiple of 10"),
        ({"n_train": 20, "top_k": 30}, "top_k=30 is not allowed; it must be at most n_train=20"),
        ({"weight_decays": (0.001, 0.001)}, "repeats a value"),
        ({"sweep_estimator": "newton"}, "sweep_estimator"),
        ({"dtype": "float16"}, "dtype"),
        ({"band_quantile": 1.5}, "band_quantile"),
    ],
)
def test_bad_parameters_are_refused_by_name(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SmallMnistConfig(**{**TINY, **bad})


def test_offline_data_are_a_disjoint_class_balanced_split_of_the_real_digits():
    data = load_data(SmallMnistConfig(**TINY))
    assert data.stand_in and data.indices_checksum is None
    assert len(data.train) == 20 and len(data.test) == 50
    assert torch.bincount(data.train.y).tolist() == [2] * 10 and torch.bincount(data.test.y).tolist() == [5] * 10
    flat_train, flat_test = data.train.x.flatten(1), data.test.x.flatten(1)
    assert not any(bool((flat_test == row).all(dim=1).any()) for row in flat_train)
    again = load_data(SmallMnistConfig(**TINY))
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)
    assert "not Koh & Liang's" in data.description


def test_a_data_root_gives_koh_and_liangs_split_and_is_part_of_the_job_key(tmp_path, monkeypatch):
    write_mnist_root(tmp_path, n_train=6000, n_test=200)
    cfg = SmallMnistConfig(**{**TINY, "data_root": str(tmp_path), "n_train": 0, "n_test": 0})
    data = load_data(cfg)
    assert not data.stand_in and len(data.train) == 100 and len(data.test) == 200  # 10 % of 6,000 − 5,000
    assert data.indices_checksum and data.indices_checksum in data.description
    monkeypatch.setenv("FRAGILE_DATA", str(tmp_path))
    via_env = load_data(SmallMnistConfig(**{**TINY, "n_train": 0, "n_test": 0}))
    assert torch.equal(via_env.train.x, data.train.x)
    real_key = model_jobs(SmallMnistConfig(**TINY))[0].key
    monkeypatch.delenv("FRAGILE_DATA")
    assert model_jobs(SmallMnistConfig(**TINY))[0].key != real_key  # a cached offline result is never reused for real data


def test_adding_a_weight_decay_to_the_sweep_keeps_the_finished_models_keys():
    before = {j.name: j.key for j in model_jobs(SmallMnistConfig(**TINY))}
    after = {j.name: j.key for j in model_jobs(SmallMnistConfig(**{**TINY, "weight_decays": (0.0, 0.001, 0.1)}))}
    assert set(after) == set(before) | {"small_mnist/seed0-wd0"}
    assert all(after[name] == key for name, key in before.items())
    moved = {j.name: j.key for j in model_jobs(SmallMnistConfig(**{**TINY, "weight_decays": (0.01, 0.1), "weight_decay": 0.01}))}
    assert (
        moved["small_mnist/seed0-wd0.1"] != before["small_mnist/seed0-wd0.1"]
    )  # conservative: the headline value decides which model gets the estimator comparison


@pytest.fixture(scope="module")
def sweep_model():
    """A non-headline model of the tiny config with influence by CG, and its inputs. The CNN's Hessian is
    indefinite (θ* is near a saddle), so the damping is made large enough for CG to apply."""
    cfg = SmallMnistConfig(**{**TINY, "damping": 5.0})
    return cfg, load_data(cfg), run_model(cfg, 0, 0.1)


def test_a_model_job_reports_its_training_and_influence(sweep_model):
    cfg, data, out = sweep_model
    assert isinstance(out, SmallMnistResult) and not out.failure and not out.headline and out.primary == "cg"
    assert out.num_params == 2616 and out.n_train == 20
    assert isinstance(out.estimators["cg"], Estimate) and out.estimators["cg"].eigenvalues is None
    assert set(out.bands) == {"top"} and len(out.bands["top"]) == cfg.n_test_points and not out.relative_error
    assert all(e.kind == "top" and not e.compared for e in out.bands["top"])
    assert out.retraining.steps == cfg.retrain_steps and out.retraining.drift.shape == (cfg.n_test_points,)
    objective = Objective(build_model("koh_liang_cnn", seed=0, dtype=torch.float32), 0.1)
    spec = TrainSpec("adam", lr=cfg.lr, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=0)
    theta = fit(objective, objective.initial_params(), data.train.x, data.train.y, spec, progress=False).params[0]
    losses = objective.sample_losses(theta, data.test.x, data.test.y).double().numpy()
    assert out.test_points.tolist() == choose_test_points(losses, cfg.n_test_points).tolist()
    # The same influences from an estimator built here, on the independently retrained θ*: exact, not CG.
    exact = make_estimator(
        "exact", objective, theta, data.train.x, data.train.y, damping=cfg.damping, negative="keep", progress=False
    )
    tp = torch.as_tensor(out.test_points)
    reference = exact.influences(data.test.x[tp], data.test.y[tp]).predicted.double().numpy()
    assert exact.spectrum.smallest + cfg.damping > 0  # H + λI positive definite: CG's system
    np.testing.assert_allclose(out.estimators["cg"].predicted, reference, rtol=2e-3, atol=2e-3 * np.abs(reference).max())


def test_shared_leave_one_out_models_are_mapped_to_the_right_test_point(sweep_model):
    cfg, data, out = sweep_model
    objective = Objective(build_model("koh_liang_cnn", seed=0, dtype=torch.float32), 0.1)
    spec = TrainSpec("adam", lr=cfg.lr, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=0)
    theta = fit(objective, objective.initial_params(), data.train.x, data.train.y, spec, progress=False).params[0]
    t = 1
    entry = out.bands["top"][t]
    i = int(entry.chosen[-1])
    tp = int(out.test_points[t])
    reference = retrained_change(objective, theta, data, i, spec.replace(steps=cfg.retrain_steps), tp)
    assert float(entry.actual[-1]) == pytest.approx(reference, rel=1e-3, abs=1e-7)
    assert entry.spearman == pytest.approx(float(__import__("scipy").stats.spearmanr(entry.predicted, entry.actual)[0]))


def _points(band, spearmans, m=50):
    ones = np.ones(m)
    return tuple(PointResult(band, np.arange(m), ones, ones, ones, s, s, s, ()) for s in spearmans)


def _model(seed, wd, headline, top, band=None, grad_norm=0.0):
    """A finished model whose chosen sets have these Spearmans, converged unless ``grad_norm`` says otherwise."""
    n = len(top)
    return SmallMnistResult(
        seed=seed,
        weight_decay=wd,
        headline=headline,
        n_train=20,
        n_test=50,
        num_params=2616,
        primary="exact",
        fit=Fit(0.0, 1.0, 1.0, grad_norm, 0.0, majority_share=0.1, prediction_spread=0.4, loss_rise=0.0),
        test_points=np.arange(n),
        test_losses=np.ones(n),
        test_labels=np.zeros(n, dtype=np.int64),
        test_predicted_labels=np.zeros(n, dtype=np.int64),
        estimators={"exact": Estimate("exact", np.ones((n, 20)), np.zeros(n), 0.0)},
        retraining=Retraining(3, 8, np.zeros(n), 0.0, 0.0),
        bands={"top": _points("top", top)} | ({} if band is None else {"band": _points("band", band)}),
        relative_error={},
    )


def _study(top, band, at_peak, above, grad_norms=(0.0, 0.0)):
    """Two seeds; per seed a headline model (wd 0.001), one at 0.01 and one at 0.1, four test points each."""
    out = []
    for seed, g in enumerate(grad_norms):
        out += [
            _model(seed, 0.001, True, top[seed], band[seed], grad_norm=g),
            _model(seed, 0.01, False, at_peak[seed]),
            _model(seed, 0.1, False, above[seed]),
        ]
    return out


WIDE = ([0.95, 0.3, 0.8, 0.1], [0.9, 0.2, 0.7, 0.05])  # top-band Spearmans over 50 points: far beyond noise


def test_claims_are_decided_by_their_rules_on_converged_models():
    cfg = SmallMnistConfig(**TINY)
    low = ([0.2, -0.1, 0.3, -0.2], [0.1, -0.05, 0.0, -0.1])
    models = _study(WIDE, low, WIDE, ([0.3, 0.0, 0.2, -0.2], [0.2, -0.1, 0.1, -0.3]))
    got = {c.key: c for c in claims(models, cfg)}
    assert {k: c.outcome for k, c in got.items()} == dict.fromkeys(("range", "band", "wd_fall"), Verdict.REPRODUCED)
    assert got["range"].decision.n == 8 and got["range"].decision.low > 0.2  # τ of z, beyond the noise of m = 50
    gaps = np.subtract(WIDE, low).ravel()
    assert got["band"].decision.estimate == pytest.approx(gaps.mean()) and got["band"].decision.n == 8
    assert got["band"].decision.null_rate <= 0.05 and got["band"].data.text() == "reduced (MNIST, 20 of 5,500 training points)"
    assert "2 of 2 headline models converged" in got["band"].note
    # No effect: the same Spearmans in both bands, and no fall at the larger weight decay.
    flat = {c.key: c for c in claims(_study(WIDE, WIDE, WIDE, WIDE), cfg)}
    assert flat["band"].outcome is Verdict.NOT_REPRODUCED and flat["wd_fall"].outcome is Verdict.NOT_REPRODUCED
    same = ([0.6] * 4, [0.6] * 4)
    assert {c.key: c for c in claims(_study(same, same, same, same), cfg)}["range"].outcome is Verdict.NOT_REPRODUCED


def test_a_model_that_did_not_converge_is_kept_out_of_the_claims():
    cfg = SmallMnistConfig(**TINY)
    low = ([0.2, -0.1, 0.3, -0.2], [0.1, -0.05, 0.0, -0.1])
    models = _study(WIDE, low, WIDE, WIDE, grad_norms=(0.0, 1.0))
    got = {c.key: c for c in claims(models, cfg)}
    assert got["band"].decision.n == 4 and "1 of 2 headline models converged" in got["band"].note
    assert got["band"].decision.estimate == pytest.approx(np.subtract(WIDE[0], low[0]).mean())
    assert "all models:" in got["band"].note and "n = 8" in got["band"].note  # the rule on every model, beside
    none = {c.key: c for c in claims(_study(WIDE, low, WIDE, WIDE, grad_norms=(1.0, 1.0)), cfg)}
    assert none["band"].verdict.startswith("inconclusive: none of 2 headline models converged")
    assert none["band"].decision is None and none["band"].ours.startswith("all models:")
    on_all = none["band"].all_models  # the rule on every model, calibrated like a decision
    assert on_all.n == 8 and on_all.null_draws == 400 and on_all.null_rate <= 0.05
    assert none["band"].null_text() == f"all models: {on_all.null_rate:.1%} of 400"
    only = {c.key: c for c in claims([m for m in models if m.weight_decay == 0.001], cfg)}
    assert only["wd_fall"].verdict.startswith("not run")


def test_the_headline_model_retrains_a_random_set_beside_the_bands():
    cfg = SmallMnistConfig(**{**TINY, "damping": 5.0, "random_k": 4})
    out = run_model(cfg, 0, 0.001)
    assert out.headline and set(out.bands) == {"top", "band", "random"}
    drawn = np.sort(np.random.default_rng(0).choice(20, 4, replace=False))
    assert all(e.chosen.tolist() == drawn.tolist() for e in out.bands["random"])
    # A point that is in both the top band and the random set was retrained once: the same actual change in both.
    top, rnd = out.bands["top"][0], out.bands["random"][0]
    for i in set(top.chosen.tolist()) & set(drawn.tolist()):
        assert rnd.actual[rnd.chosen.tolist().index(i)] == top.actual[top.chosen.tolist().index(i)]


def test_the_polish_phase_continues_from_the_minibatch_model_on_the_whole_training_set():
    cfg = SmallMnistConfig(**{**TINY, "polish_steps": 40})
    data = load_data(cfg)
    out = run_model(cfg, 0, 0.1)
    # the same two phases built here: minibatch Adam, then full-batch Adam from where it stopped
    objective = Objective(build_model("koh_liang_cnn", seed=0, dtype=torch.float32), 0.1)
    spec = TrainSpec("adam", lr=cfg.lr, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=0)
    first = fit(objective, objective.initial_params(), data.train.x, data.train.y, spec, progress=False)
    polished = fit(
        objective, first.params[0], data.train.x, data.train.y, spec.replace(steps=40, batch_size=None), progress=False
    )
    assert out.fit.grad_norm == pytest.approx(float(polished.grad_norm[0]), rel=1e-5)
    assert out.fit.grad_norm < float(first.grad_norm[0])  # full-batch steps bring θ* nearer a stationary point
    theta = polished.params[0]
    assert out.fit.train_loss == pytest.approx(float(objective.sample_losses(theta, data.train.x, data.train.y).mean()), rel=1e-5)
    with pytest.raises(InvalidArgumentError, match="polish_steps"):
        SmallMnistConfig(**{**TINY, "polish_steps": -1})
