p='fragile/mnist_cifar10.py'; s=open(p).read()
def rep(a,b,cnt=1):
    global s
    assert s.count(a)==cnt,(a,s.count(a)); s=s.replace(a,b)
rep('''    model = build_network(cfg, architecture, dataset, seed).to(dev)
    objective = Objective(model, weight_decay)
    spec = TrainSpec(cfg.optimizer, lr=cfg.lr, steps=cfg.train_steps, batch_size=cfg.batch_size, seed=seed)''','''    model = build_network(cfg, architecture, dataset, seed, data.num_classes).to(dev)
    objective = Objective(model, weight_decay)
    spec = cfg.train_spec(seed)''')
rep('''    tp = choose_test_points(test_losses, 2)  # the highest-loss and the median-loss test point''','''    tp, kinds = test_points_by_kind(test_losses, cfg.test_points_per_kind)''')
rep('''    for t, kind in enumerate(TEST_POINTS):''','''    for t, kind in enumerate(kinds):''')
rep('''def run_model(cfg: MnistCifar10Config,''','''def test_points_by_kind(test_losses: np.ndarray, per_kind: int) -> tuple[np.ndarray, list[str]]:
    """The ``per_kind`` highest-loss test points and the ``per_kind`` nearest the median loss (by rank, the median
    first, then alternately below and above it), with their kinds. With one of each: the paper's Table 1 pair."""
    losses = np.asarray(test_losses, dtype=float)
    check_int("per_kind", per_kind, minimum=1, maximum=max(1, losses.size // 4))
    order = np.argsort(-losses, kind="stable")
    median_rank = (losses.size - 1) // 2
    offsets = [0] + [o for k in range(1, per_kind) for o in (k, -k)]
    median_ranks = sorted(median_rank + o for o in offsets[:per_kind])
    tp = np.concatenate([order[:per_kind], order[median_ranks]])
    return tp, [TEST_POINTS[0]] * per_kind + [TEST_POINTS[1]] * per_kind


def run_model(cfg: MnistCifar10Config,''')
rep('''_NOT_IN_KEY = (*NOT_IN_JOB_KEY, "seed", "n_seeds", "mnist_architectures", "cifar10_architectures", "weight_decays")''','''_NOT_IN_KEY = (*NOT_IN_JOB_KEY, "seed", "n_seeds", "mnist_architectures", "cifar10_architectures", "cifar100_architectures", "weight_decays")''')
rep('''    header = {"mnist": "MNIST", "cifar10": "CIFAR-10"}''','''    header = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}''')
open(p,'w').write(s)
