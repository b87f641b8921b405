import importlib.util
import sys

import pytest
import torch

from mlpfuse.compress import kmeans as km
from mlpfuse.errors import EnvironmentProblem, InputError

CPU_BACKENDS = [b for b in ("torch", "faiss") if b == "torch" or km.available_backends()["faiss-cpu"]]


def planted(n_clusters=6, per=20, d=16, spread=10.0, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, d, generator=g) * spread
    truth = torch.arange(n_clusters).repeat_interleave(per)
    x = centers[truth] + noise * torch.randn(len(truth), d, generator=g)
    perm = torch.randperm(len(truth), generator=g)
    return x[perm], truth[perm]


def duplicated(m, r, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, d, generator=g)
    ids = torch.arange(m).repeat(r)[torch.randperm(m * r, generator=g)]
    return rows[ids], ids


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def check_result(res, x, k):
    assert res.labels.dtype == torch.int64 and res.labels.shape == (x.shape[0],)
    assert torch.bincount(res.labels, minlength=k).min() >= 1 and res.labels.max() < k
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (k, x.shape[1])
    assert torch.isfinite(res.centroids).all()
    x64 = x.double()
    for j in range(k):
        assert torch.allclose(res.centroids[j].double(), x64[res.labels == j].mean(0), atol=1e-5)
    inertia = ((x64 - res.centroids.double()[res.labels]) ** 2).sum().item()
    assert res.inertia == pytest.approx(inertia, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_planted_clusters_recovered(backend):
    x, truth = planted()
    res = km.kmeans(x, 6, backend=backend, device="cpu")
    assert res.backend == f"{backend}-cpu"
    assert same_partition(res.labels, truth)
    check_result(res, x, 6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_duplicated_neurons_give_one_cluster_each(backend):
    x, ids = duplicated(m=7, r=5)
    res = km.kmeans(x, 7, backend=backend, device="cpu")
    assert same_partition(res.labels, ids)
    assert res.inertia == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fewer_distinct_points_than_k(backend):
    x, _ = duplicated(m=4, r=5)
    res = km.kmeans(x, 10, backend=backend, device="cpu")
    check_result(res, x, 10)
    assert res.inertia == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
    a = km.kmeans(x, 25, seed=3, backend=backend, device="cpu")
    b = km.kmeans(x, 25, seed=3, backend=backend, device="cpu")
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    c = km.kmeans(x, 25, seed=4, backend=backend, device="cpu")
    assert not torch.equal(a.labels, c.labels)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k_equals_n(backend):
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    res = km.kmeans(x, 30, backend=backend, device="cpu")
    assert sorted(res.labels.tolist()) == list(range(30))
    assert res.inertia == 0.0


def test_k_one_and_low_precision_input():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    res = km.kmeans(x, 1, backend="torch", device="cpu")
    assert res.labels.eq(0).all()
    assert torch.allclose(res.centroids[0], x.float().mean(0), atol=1e-6)


def test_n_init_keeps_the_best():
    x, _ = planted(n_clusters=12, per=10, spread=1.0, noise=0.5)
    runs = [km.kmeans(x, 8, seed=s, backend="torch", device="cpu").inertia for s in range(3)]
    best = km.kmeans(x, 8, seed=0, backend="torch", device="cpu", n_init=3)
    assert best.inertia == min(runs)


@pytest.mark.parametrize("k", [0, 31, -1, 2.5, True])
def test_bad_k(k):
    with pytest.raises(InputError):
        km.kmeans(torch.randn(30, 4), k, backend="torch", device="cpu")


def test_numpy_integer_k():
    np = pytest.importorskip("numpy")
    assert km.kmeans(torch.randn(30, 4), np.int64(3), backend="torch", device="cpu").centroids.shape == (3, 4)


def test_bad_input():
    with pytest.raises(InputError):
        km.kmeans(torch.randn(30), 2, backend="torch", device="cpu")
    x = torch.randn(30, 4)
    x[3, 1] = float("nan")
    with pytest.raises(InputError):
        km.kmeans(x, 2, backend="torch", device="cpu")
    with pytest.raises(InputError):
        km.kmeans(torch.randn(30, 4), 2, backend="torch", device="cpu", max_iter=0)


def test_unknown_backend_or_device():
    with pytest.raises(InputError):
        km.kmeans(torch.randn(30, 4), 2, backend="sklearn")
    with pytest.raises(InputError):
        km.resolve_backend("torch", device="tpu")
    with pytest.raises(InputError):
        km.resolve_backend("torch", device="not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    assert km.available_backends()["torch-cuda"] is False
    assert km.resolve_backend("torch") == "torch-cpu"
    for backend in km.BACKENDS:
        with pytest.raises(EnvironmentProblem):
            km.kmeans(torch.randn(30, 4), 2, backend=backend, device="cuda")
    with pytest.raises(EnvironmentProblem):
        km.kmeans_batched(torch.randn(2, 30, 4), 2, device="cuda:0")


def test_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    # A fresh copy of the module, so that importing it without faiss is part of the test.
    spec = importlib.util.spec_from_file_location("mlpfuse._kmeans_without_faiss", km.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    assert mod.available_backends()["faiss-cpu"] is False
    assert mod.resolve_backend("auto", "cpu") == "torch-cpu"
    with pytest.raises(EnvironmentProblem):
        mod.kmeans(torch.randn(30, 4), 2, backend="faiss", device="cpu")
    assert mod.kmeans(torch.randn(30, 4), 2, device="cpu").backend == "torch-cpu"


@pytest.mark.skipif(not km.available_backends()["faiss-cpu"], reason="faiss not installed")
def test_auto_prefers_faiss_on_cpu():
    assert km.resolve_backend("auto", "cpu") == "faiss-cpu"
    assert km.resolve_backend("faiss", "cpu") == "faiss-cpu"


def structured(n=600, d=24, blobs=40, seed=0):
    """Blobs of very unequal size (a few big, many small), roughly like clustered neuron weights."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, blobs + 1).double() ** 1.2
    ids = torch.multinomial(weights, n, replacement=True, generator=g)
    centers = torch.randn(blobs, d, generator=g) * 3
    scale = 0.2 + torch.rand(blobs, 1, generator=g)
    return centers[ids] + scale[ids] * torch.randn(n, d, generator=g)


def test_greedy_seeding_beats_random_rows():
    x = structured()[None]
    sq = (x * x).sum(2)
    k = 30
    pp, rnd, pp_final, rnd_final = [], [], [], []
    tol = km._tolerance(x)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        seeds = km._kmeanspp(x, sq, k, g)
        rows = x[:, torch.randperm(x.shape[1], generator=g)[:k]]
        pp.append(km._assign(x, sq, seeds)[1].sum().item())
        rnd.append(km._assign(x, sq, rows)[1].sum().item())
        pp_final.append(km._assign(x, sq, km._lloyd(x, sq, seeds, 100, tol)[0])[1].sum().item())
        rnd_final.append(km._assign(x, sq, km._lloyd(x, sq, rows, 100, tol)[0])[1].sum().item())
    assert sum(pp) < 0.8 * sum(rnd)
    assert sum(pp_final) < sum(rnd_final)
    assert sum(pp_final) < 0.95 * sum(pp)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quality_close_to_sklearn(backend):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = structured(n=800, d=32, blobs=200)
    ref = sklearn_cluster.KMeans(100, n_init=10, random_state=0).fit(x.numpy()).inertia_
    ours = [km.kmeans(x, 100, seed=s, backend=backend, device="cpu").inertia for s in range(3)]
    assert sum(ours) / 3 < 1.03 * ref


def test_empty_clusters_move_to_farthest_points():
    x = torch.tensor([[0.0], [1.0], [10.0], [20.0]])[None]
    mind = torch.tensor([[0.0, 1.0, 4.0, 9.0]])
    means = torch.tensor([[[0.5], [0.0], [15.0], [0.0]]])
    counts = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    moved = km._relocate_empty(x, mind, means, counts)
    assert moved.flatten().tolist() == [0.5, 20.0, 15.0, 10.0]


def test_lloyd_refills_empty_clusters():
    x, _ = planted(n_clusters=3, per=10, d=4)
    x = (x + 100.0)[None]  # far from the origin, where an unfilled empty cluster's zero mean would sit
    sq = (x * x).sum(2)
    init = torch.cat([x[:, :3], torch.full((1, 1, 4), 1000.0)], 1)  # the 4th centroid wins no point
    c, _ = km._lloyd(x, sq, init, 20, km._tolerance(x))
    labels, _ = km._assign(x, sq, c)
    assert torch.bincount(labels[0], minlength=4).min() >= 1


def test_batched_lloyd_equals_independent_problems():
    xs = torch.stack([structured(n=200, d=8, blobs=20, seed=s) for s in range(3)])
    sq = (xs * xs).sum(2)
    init = xs[:, :12].clone()
    c, iters = km._lloyd(xs, sq, init, 100, km._tolerance(xs))
    for b in range(3):
        cb, ib = km._lloyd(xs[b:b + 1], sq[b:b + 1], init[b:b + 1], 100, km._tolerance(xs[b:b + 1]))
        assert torch.allclose(c[b], cb[0], atol=1e-5) and iters[b] == ib[0]


def test_batched_matches_single_problem_quality():
    xs = torch.stack([structured(n=300, d=16, blobs=30, seed=s) for s in range(6)])
    batched_total = single_total = 0.0
    for seed in range(3):  # single problems vary by +-10% between seeds: compare totals
        batched = km.kmeans_batched(xs, 20, seed=seed, device="cpu")
        assert len(batched) == 6
        for b, x in zip(batched, xs):
            assert b.backend == "torch-cpu"
            check_result(b, x, 20)
            batched_total += b.inertia
            single_total += km.kmeans(x, 20, seed=seed, backend="torch", device="cpu").inertia
    assert batched_total == pytest.approx(single_total, rel=0.05)


def test_batched_of_one_equals_torch_backend():
    x, _ = planted(n_clusters=12, per=10, spread=1.0, noise=0.5)
    (b,) = km.kmeans_batched(x[None], 8, seed=5, device="cpu")
    s = km.kmeans(x, 8, seed=5, backend="torch", device="cpu")
    assert torch.equal(b.labels, s.labels) and b.iterations == s.iterations


def test_batched_fewer_distinct_points_than_k():
    xs = torch.stack([duplicated(m=3, r=4, seed=s)[0] for s in range(3)])
    for res, x in zip(km.kmeans_batched(xs, 6, device="cpu"), xs):
        check_result(res, x, 6)


# ---- seeding: k-means|| (default) and greedy k-means++


def test_unknown_init():
    with pytest.raises(InputError, match="seeding"):
        km.kmeans(torch.randn(20, 3), 4, init="random")


@pytest.mark.parametrize("n", [800, 150])  # m = 1 + 5k = 201 < n: oversampling; m >= n: every point a candidate
def test_parallel_seeding_deterministic_and_non_empty(n):
    x = structured(n=n, d=16, blobs=60)
    a = km.kmeans(x, 40, seed=2, backend="torch", device="cpu", init="kmeans-parallel")
    b = km.kmeans(x, 40, seed=2, backend="torch", device="cpu", init="kmeans-parallel")
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    check_result(a, x, 40)
    c = km.kmeans(x, 40, seed=3, backend="torch", device="cpu", init="kmeans-parallel")
    assert not torch.equal(a.labels, c.labels)


def test_parallel_seeding_draws_distinct_centres_on_duplicates():
    x, _ = duplicated(m=12, r=40)  # n = 480 > 1 + 5k: the oversampling path, many duplicate candidates
    seeds = km._kmeans_parallel(x[None], (x * x).sum(1)[None], 12, torch.Generator().manual_seed(0))
    assert torch.unique(seeds[0], dim=0).shape[0] == 12  # one centre on each distinct row


@pytest.mark.parametrize("n", [1200, 250])  # m = 301: the oversampling path, then every point a candidate
def test_parallel_seeding_quality_close_to_greedy(n):
    x = structured(n=n, d=24, blobs=120)
    k = 60
    greedy = [km.kmeans(x, k, seed=s, backend="torch", device="cpu", init="greedy").inertia for s in range(3)]
    par = [km.kmeans(x, k, seed=s, backend="torch", device="cpu", init="kmeans-parallel").inertia for s in range(3)]
    assert sum(par) < 1.02 * sum(greedy)
    # and far better than seeding with random rows
    g = torch.Generator().manual_seed(0)
    rows = x[torch.randperm(n, generator=g)[:k]][None]
    x3 = x[None]
    sq = (x3 * x3).sum(2)
    seeds = km._kmeans_parallel(x3, sq, k, torch.Generator().manual_seed(0))
    assert km._assign(x3, sq, seeds)[1].sum() < 0.8 * km._assign(x3, sq, rows)[1].sum()


def test_parallel_seeding_batched_equals_single():
    xs = torch.stack([structured(n=400, d=12, blobs=30, seed=s) for s in range(3)])
    batched = km.kmeans_batched(xs, 20, seed=5, init="kmeans-parallel")
    one = km.kmeans_batched(xs[:1], 20, seed=5, init="kmeans-parallel")[0]
    single = km.kmeans(xs[0], 20, seed=5, backend="torch", device="cpu", init="kmeans-parallel")
    assert torch.equal(one.labels, single.labels)
    for b, res in enumerate(batched):
        check_result(res, xs[b], 20)


def test_fuse_kmeans_init_option(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mlpfuse.cli import app

    source, _, _ = tiny_checkpoint("llama")
    runner = CliRunner()
    bad = runner.invoke(app, ["fuse", str(source), "-o", str(tmp_path / "x"), "--ratio", "0.5", "--kmeans-init", "random"])
    assert bad.exit_code == 2 and "seeding" in bad.output and not (tmp_path / "x").exists()
    outs = {}
    for init in km.INITS:
        res = runner.invoke(app, ["fuse", str(source), "-o", str(tmp_path / init), "--ratio", "0.5", "--backend", "torch",
                                  "--kmeans-init", init])
        assert res.exit_code == 0, res.output
        outs[init] = (tmp_path / init / "model.safetensors").read_bytes()
        assert f"kmeans_init: {init}" in (tmp_path / init / "mlpfuse_recipe.yaml").read_text()
    assert outs["greedy"] != outs["kmeans-parallel"]  # the option reaches k-means


FAISS_ONLY = pytest.mark.skipif(not km.available_backends()["faiss-cpu"], reason="faiss not installed")


@FAISS_ONLY
@pytest.mark.parametrize("seed", [2**31 - 1, 2**31, 2**32 - 1])
def test_every_documented_seed_runs_through_faiss(seed):
    x, truth = planted()
    first = km.kmeans(x, 6, seed=seed, backend="faiss", n_init=2)  # seed + 1 is past 2**32 - 1 too
    again = km.kmeans(x, 6, seed=seed, backend="faiss", n_init=2)
    check_result(first, x, 6)
    assert torch.equal(first.labels, again.labels) and same_partition(first.labels, truth)


def test_faiss_seed_is_the_seed_below_2_31_and_wraps_above():
    assert [km.faiss_seed(s) for s in (0, 7, 2**31 - 1)] == [0, 7, 2**31 - 1]  # outputs of these seeds unchanged
    assert km.faiss_seed(2**31) == 0 and km.faiss_seed(2**32 - 1) == 2**31 - 1 and km.faiss_seed(2**32 + 9) == 9


@FAISS_ONLY
def test_fuse_with_the_largest_seed_through_faiss(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mlpfuse.cli import app

    source, _, _ = tiny_checkpoint("bert")
    result = CliRunner().invoke(app, ["fuse", str(source), "-o", str(tmp_path / "out"), "--dim", "8",
                                      "--backend", "faiss", "--seed", str(2**32 - 1)])
    assert result.exit_code == 0, result.output
    assert "seed: 4294967295" in (tmp_path / "out" / "mlpfuse_recipe.yaml").read_text()
