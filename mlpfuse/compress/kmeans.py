"""k-means behind one call: FAISS (CPU/GPU) or native torch (CPU/CUDA), same seeding, same finish.

Every backend starts from the same seeding (k-means|| by default, or greedy k-means++; torch, on
the compute device) and
ends the same way: nearest-centroid labels, empty clusters repaired, centroids and inertia
recomputed from the members in float64 on the CPU. Only the Lloyd iterations in between differ.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch

from mlpfuse.errors import EnvironmentProblem, InputError
from mlpfuse.runtime import resolve_device

BACKENDS = ("auto", "faiss", "torch")

# Chosen on MiniLM layer 3 at k=384 (docs/kmeans.md): one run is within 1% of scikit-learn n_init=30.
DEFAULT_MAX_ITER = 100
DEFAULT_N_INIT = 1
TOL = 1e-4  # centroid-shift tolerance, relative to the mean per-feature variance (as scikit-learn)
INITS = ("greedy", "kmeans-parallel")
DEFAULT_INIT = "kmeans-parallel"  # chosen from benchmarks/seeding_bench.py (docs/kmeans.md)
PARALLEL_ROUNDS = 5  # k-means|| oversampling passes (Bahmani et al. 2012 use about 5)
PARALLEL_OVERSAMPLING = 1.0  # candidates drawn per pass, as a multiple of k (their l = k)
FAISS_CHUNK = 10  # FAISS has no stopping rule: run it this many iterations at a time, then test the shift
FAISS_SEEDS = 2**31  # faiss.ClusteringParameters.seed is a C int: 0 .. 2**31 - 1


@dataclass
class KMeansResult:
    """Outcome of one k-means problem. Tensors are on the CPU."""

    labels: torch.Tensor  # int64 [n], every cluster 0..k-1 non-empty
    centroids: torch.Tensor  # float32 [k, d], the mean of each cluster's members
    inertia: float  # sum of squared distances to the cluster means, float64
    seconds: float  # wall time
    backend: str  # "faiss-cpu" | "faiss-gpu" | "torch-cpu" | "torch-cuda"
    iterations: int


# ---------------------------------------------------------------------------------------------
# Backend selection


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_has_gpu(faiss) -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def available_backends() -> dict[str, bool]:
    """Which concrete backends can run here."""
    faiss = _faiss()
    return {
        "faiss-cpu": faiss is not None,
        "faiss-gpu": _faiss_has_gpu(faiss),
        "torch-cpu": True,
        "torch-cuda": torch.cuda.is_available(),
    }


def _device(device) -> torch.device:
    """None/"auto" -> cuda if available else cpu; an explicit cuda without a GPU is an EnvironmentProblem."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _resolve(backend: str, device) -> tuple[str, torch.device]:
    if backend not in BACKENDS:
        raise InputError(f"unknown k-means backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    dev = _device(device)
    faiss = _faiss()
    if backend == "torch":
        return ("torch-cuda" if dev.type == "cuda" else "torch-cpu"), dev
    if backend == "faiss":
        if faiss is None:
            raise EnvironmentProblem("k-means backend 'faiss' asked for, but faiss is not installed: "
                                     "pip install faiss-cpu (or faiss-gpu), or use backend 'torch'")
        if dev.type == "cuda" and _faiss_has_gpu(faiss):
            return "faiss-gpu", dev
        return "faiss-cpu", torch.device("cpu")
    # auto
    if dev.type == "cuda":
        return ("faiss-gpu" if _faiss_has_gpu(faiss) else "torch-cuda"), dev
    return ("faiss-cpu" if faiss is not None else "torch-cpu"), dev


def resolve_backend(backend: str, device=None) -> str:
    """The concrete backend that ``kmeans(..., backend=backend, device=device)`` would run."""
    return _resolve(backend, device)[0]


# ---------------------------------------------------------------------------------------------
# Torch core, batched over independent problems: x is [B, n, d] float32 on the compute device.


def _sq_dist_to(x: torch.Tensor, sq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, t, n] from the points x[b, idx[b, j]] to all points of problem b."""
    d = x.shape[2]
    cx = torch.gather(x, 1, idx[..., None].expand(-1, -1, d))
    csq = torch.gather(sq, 1, idx)
    dist = torch.baddbmm(csq[..., None] + sq[:, None, :], cx, x.transpose(1, 2), alpha=-2.0)
    return dist.clamp_min_(0.0)


def _kmeanspp(x: torch.Tensor, sq: torch.Tensor, k: int, gen: torch.Generator, steps: int | None = None,
              w: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding; returns initial centroids [B, k, d].

    Each step draws 2 + int(log k) candidates with probability proportional to the (weighted, with
    point weights ``w`` [B, n]) squared distance to the nearest chosen centre and keeps the one that
    lowers the potential most.
    The loop only queues device work (no .item()), so on a GPU it is not held up by the host.
    ``steps`` stops after that many centres (benchmarks time the first steps; the rest stay 0).
    """
    B, n, d = x.shape
    trials = 2 + int(math.log(k))
    rows = torch.arange(B, device=x.device)
    centers = torch.zeros(B, k, dtype=torch.long, device=x.device)
    if w is None:
        centers[:, 0] = torch.randint(n, (B,), generator=gen, device=x.device)
        w = torch.ones(B, n, dtype=x.dtype, device=x.device)
    else:
        centers[:, 0] = torch.multinomial(w, 1, generator=gen)[:, 0]
    closest = _sq_dist_to(x, sq, centers[:, :1])[:, 0]  # [B, n]
    for i in range(1, k if steps is None else min(k, steps)):
        # When every point already sits on a centre (fewer distinct points than k), draw by weight.
        pot = closest * w
        weights = torch.where(pot.sum(1, keepdim=True) > 0, pot, w)
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)  # [B, t]
        dist = torch.minimum(_sq_dist_to(x, sq, cand), closest[:, None, :])  # [B, t, n]
        best = (dist * w[:, None, :]).sum(2).argmin(1)  # [B]
        closest = dist[rows, best]
        centers[:, i] = cand[rows, best]
    return torch.gather(x, 1, centers[..., None].expand(-1, -1, d))


def _kmeans_parallel(x: torch.Tensor, sq: torch.Tensor, k: int, gen: torch.Generator,
                     rounds: int = PARALLEL_ROUNDS, oversampling: float = PARALLEL_OVERSAMPLING,
                     w: torch.Tensor | None = None) -> torch.Tensor:
    """k-means|| seeding (Bahmani et al. 2012); returns initial centroids [B, k, d].

    1. Oversampling: one centre drawn uniformly, then ``rounds`` passes that each draw
       ``l = ceil(oversampling * k)`` candidates (with replacement, a fixed count so shapes stay
       static and nothing is read back to the host) with probability proportional to the squared
       distance to the nearest candidate so far. One [l, n] distance block per pass.
    2. Each candidate is weighted by the number of points nearest to it.
    With point weights ``w`` [B, n] (weighted k-means) the first centre and every draw are also
    proportional to ``w``, and a candidate's weight is the total weight of the points nearest to it.
    3. Weighted greedy k-means++ on the ``m = 1 + rounds * l`` candidates, from their [m, m]
       squared-distance matrix computed once: each of the k steps is then a gather over m values.
    When ``m >= n`` the oversampling would cover the data anyway: every point is a candidate of
    weight 1 and step 3 is greedy k-means++ on the points, from the [n, n] distance matrix.
    Memory: the [B, min(m, n), min(m, n)] float32 matrix on top of the input.
    """
    B, n, d = x.shape
    per_round = math.ceil(oversampling * k)
    m = 1 + rounds * per_round
    weighted = w is not None
    w = torch.ones(B, n, dtype=x.dtype, device=x.device) if w is None else w
    if m >= n:
        cand = torch.arange(n, device=x.device).expand(B, n)
        weight = w
    else:
        cand = torch.empty(B, m, dtype=torch.long, device=x.device)
        cand[:, 0] = (torch.multinomial(w, 1, generator=gen)[:, 0] if weighted
                      else torch.randint(n, (B,), generator=gen, device=x.device))
        closest = _sq_dist_to(x, sq, cand[:, :1])[:, 0]  # [B, n]
        nearest = torch.zeros(B, n, dtype=torch.long, device=x.device)  # index into cand
        for r in range(rounds):
            lo = 1 + r * per_round
            pot = closest * w
            weights = torch.where(pot.sum(1, keepdim=True) > 0, pot, w)
            new = torch.multinomial(weights, per_round, replacement=True, generator=gen)  # [B, l]
            cand[:, lo:lo + per_round] = new
            dmin, arg = _sq_dist_to(x, sq, new).min(1)  # [B, n]
            better = dmin < closest
            nearest = torch.where(better, arg + lo, nearest)
            closest = torch.where(better, dmin, closest)
        weight = torch.zeros(B, m, dtype=x.dtype, device=x.device)
        weight.scatter_add_(1, nearest, w)
    xc, sqc = (x, sq) if m >= n else (torch.gather(x, 1, cand[..., None].expand(-1, -1, d)), torch.gather(sq, 1, cand))
    dist = torch.baddbmm(sqc[:, :, None] + sqc[:, None, :], xc, xc.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)
    dist.diagonal(dim1=1, dim2=2).zero_()
    del xc, sqc
    chosen = _weighted_kmeanspp(dist, weight, k, gen)  # [B, k] indices into cand
    return torch.gather(x, 1, torch.gather(cand, 1, chosen)[..., None].expand(-1, -1, d))


def _weighted_kmeanspp(dist: torch.Tensor, weight: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ over m weighted points given their squared distances [B, m, m].

    Returns the chosen indices [B, k]. The same rule as :func:`_kmeanspp` (2 + int(log k) trials
    per step, keep the one that lowers the weighted potential most), each step a gather of rows.
    """
    B, m, _ = dist.shape
    trials = 2 + int(math.log(k))
    rows = torch.arange(B, device=dist.device)
    chosen = torch.empty(B, k, dtype=torch.long, device=dist.device)
    chosen[:, 0] = torch.multinomial(weight, 1, generator=gen)[:, 0]
    closest = dist[rows, chosen[:, 0]]  # [B, m]
    for i in range(1, k):
        pot = closest * weight
        # When every weighted candidate already sits on a centre, draw by weight alone.
        probs = torch.where(pot.sum(1, keepdim=True) > 0, pot, weight)
        tried = torch.multinomial(probs, trials, replacement=True, generator=gen)  # [B, t]
        d = torch.minimum(torch.gather(dist, 1, tried[..., None].expand(-1, -1, m)), closest[:, None, :])
        best = (d * weight[:, None, :]).sum(2).argmin(1)
        closest = d[rows, best]
        chosen[:, i] = tried[rows, best]
    return chosen


def _seed(x: torch.Tensor, sq: torch.Tensor, k: int, gen: torch.Generator, init: str,
          w: torch.Tensor | None = None) -> torch.Tensor:
    """Initial centroids [B, k, d] by the named seeding (point weights ``w`` [B, n] or None)."""
    if init == "greedy":
        return _kmeanspp(x, sq, k, gen, w=w)
    return _kmeans_parallel(x, sq, k, gen, w=w)


def _assign(x: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point: labels [B, n] and squared distance [B, n]."""
    csq = (c * c).sum(2)
    # ||x||^2 is the same for every centroid, so it is left out of the argmin and added after.
    part = torch.baddbmm(csq[:, None, :], x, c.transpose(1, 2), alpha=-2.0)
    mind, labels = part.min(2)
    return labels, (mind + sq).clamp_min_(0.0)


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int,
                   w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Member (weighted) means ([B, k, d], zero for empty clusters) and member counts [B, k]."""
    B, n, d = x.shape
    if x.is_cuda:
        # A one-hot matmul instead of index_add_: CUDA's atomic adds would sum in a random order.
        onehot = torch.zeros(B, n, k, device=x.device, dtype=x.dtype).scatter_(2, labels[..., None], 1.0)
        counts = onehot.sum(1)
        if w is not None:
            onehot = onehot * w[..., None]
        sums = torch.bmm(onehot.transpose(1, 2), x)
        mass = counts if w is None else onehot.sum(1)
    else:
        flat = (labels + torch.arange(B, device=x.device)[:, None] * k).reshape(-1)
        rows = x.reshape(-1, d) if w is None else (x * w[..., None]).reshape(-1, d)
        sums = torch.zeros(B * k, d, dtype=x.dtype, device=x.device).index_add_(0, flat, rows)
        sums = sums.view(B, k, d)
        counts = torch.bincount(flat, minlength=B * k).view(B, k).to(x.dtype)
        mass = counts if w is None else torch.zeros(B * k, dtype=x.dtype, device=x.device).index_add_(
            0, flat, w.reshape(-1)).view(B, k)
    return sums / torch.where(counts > 0, mass, 1.0)[..., None], counts


def _relocate_empty(x, mind, means, counts):
    """Move the centroid of each empty cluster onto one of the points farthest from its centroid."""
    empty = counts == 0
    order = mind.argsort(dim=1, descending=True)  # [B, n]
    rank = (empty.cumsum(1) - 1).clamp_(0, x.shape[1] - 1)  # j-th empty cluster gets j-th farthest point
    far = torch.gather(order, 1, rank)
    far_x = torch.gather(x, 1, far[..., None].expand(-1, -1, x.shape[2]))
    return torch.where(empty[..., None], far_x, means)


def _lloyd(x, sq, c, max_iter: int, tol: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations (weighted means with point weights ``w``) until the centroid shift is <= tol
    (per problem) or max_iter."""
    B = x.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    iters = torch.zeros(B, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        labels, mind = _assign(x, sq, c)
        means, counts = _cluster_means(x, labels, c.shape[1], w)
        new = _relocate_empty(x, mind, means, counts)
        shift = ((new - c) ** 2).sum((1, 2))
        c = torch.where(done[:, None, None], c, new)  # finished problems stay as they are
        iters += (~done).long()
        done |= shift <= tol
        if bool(done.all()):
            break
    return c, iters


def _tolerance(x: torch.Tensor) -> torch.Tensor:
    return TOL * x.var(dim=1, unbiased=False).mean(1)


# ---------------------------------------------------------------------------------------------
# Finish (same for every backend) and FAISS


def _finish(x_cpu: torch.Tensor, labels: torch.Tensor, k: int,
            w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Repair empty clusters, then exact float64 member means and inertia (weighted by ``w`` [n] when
    given). x_cpu is [n, d] float32."""
    labels = labels.cpu().clone()
    counts = torch.bincount(labels, minlength=k)
    for j in torch.nonzero(counts == 0).flatten().tolist():
        # Deterministic: the member farthest from the mean of the largest cluster (first on ties).
        big = int(torch.argmax(counts))
        members = torch.nonzero(labels == big).flatten()
        pts = x_cpu[members].double()
        far = members[int(torch.argmax(((pts - pts.mean(0)) ** 2).sum(1)))]
        labels[far] = j
        counts[big] -= 1
        counts[j] = 1
    w = None if w is None else w.cpu().double()
    sums = torch.zeros(k, x_cpu.shape[1], dtype=torch.float64)
    inertia = 0.0
    chunk = max(1, (16 << 20) // (8 * x_cpu.shape[1]))  # rows per float64 block of about 16 MB
    for s in range(0, x_cpu.shape[0], chunk):
        rows = x_cpu[s:s + chunk].double() if w is None else x_cpu[s:s + chunk].double() * w[s:s + chunk, None]
        # index_put_ accumulates in the same order as index_add_, several times faster on CPU
        sums.index_put_((labels[s:s + chunk],), rows, accumulate=True)
    mass = counts.double() if w is None else torch.zeros(k, dtype=torch.float64).index_add_(0, labels, w)
    means = sums / mass[:, None]
    for s in range(0, x_cpu.shape[0], chunk):
        diff = x_cpu[s:s + chunk].double() - means[labels[s:s + chunk]]
        sq_dist = (diff * diff).sum(1)
        inertia += float(sq_dist.sum() if w is None else (sq_dist * w[s:s + chunk]).sum())
    return labels, means.float(), inertia


def faiss_seed(seed: int) -> int:
    """The seed handed to FAISS for ``seed``: itself below 2**31, else wrapped into [0, 2**31) (``seed % 2**31``).

    FAISS takes a signed 32-bit seed; mlpfuse's seeds go to 2**32 - 1 and beyond (``seed + run``,
    ``seed + iterations``). Deterministic, and every seed below 2**31 reaches FAISS as it always did.
    Two seeds 2**31 apart share a FAISS seed but not the seeding (torch takes the whole seed).
    """
    return seed % FAISS_SEEDS


def _faiss_lloyd(x: torch.Tensor, init: torch.Tensor, max_iter: int, seed: int, dev: torch.device,
                 tol: float, w: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """FAISS Lloyd iterations from the given centroids (point weights ``w`` [n] or None); returns
    centroids [k, d] and iterations run."""
    faiss = _faiss()
    n, d = x.shape
    k = init.shape[0]
    xn = x.detach().cpu().contiguous().numpy()
    c = init.detach().cpu().contiguous().numpy()
    wn = None if w is None else w.detach().to("cpu", torch.float32).contiguous().numpy()
    res = faiss.StandardGpuResources() if dev.type == "cuda" else None
    done = 0
    while done < max_iter:
        cp = faiss.ClusteringParameters()
        cp.niter = min(FAISS_CHUNK, max_iter - done)
        cp.seed = faiss_seed(seed + done)
        cp.verbose = False
        cp.min_points_per_centroid = 1
        cp.max_points_per_centroid = n  # never subsample: neuron counts are small
        if res is not None:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = dev.index
            index = faiss.GpuIndexFlatL2(res, d, cfg)
        else:
            index = faiss.IndexFlatL2(d)
        clus = faiss.Clustering(d, k, cp)
        faiss.copy_array_to_vector(c.ravel(), clus.centroids)
        clus.train(xn, index, wn)
        new = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
        done += cp.niter
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= tol:  # moved less over the whole chunk than one step of a converged run may
            break
    return torch.from_numpy(c.copy()), done


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise InputError(f"k-means needs 1 <= k <= n (number of neurons = {n}); got k={k!r}")
    return int(k)


def _check_x(x, dims: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != dims or 0 in x.shape:
        raise InputError(f"k-means input must be a non-empty {dims}-D tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise InputError("k-means input contains NaN or inf values: check the weights being clustered")


def check_init(init) -> str:
    """The seeding name ``init`` stands for (None = ``DEFAULT_INIT``); InputError if unknown."""
    init = DEFAULT_INIT if init is None else init
    if init not in INITS:
        raise InputError(f"unknown k-means seeding {init!r}: choose one of {', '.join(INITS)}")
    return init


def _check_iters(max_iter, n_init=1) -> None:
    if max_iter < 1 or n_init < 1:
        raise InputError(f"max_iter and n_init must be >= 1, got max_iter={max_iter}, n_init={n_init}")


def _check_weights(weights, n: int) -> torch.Tensor | None:
    """Point weights as float32 [n] with a floor of 1e-9 of their mean (a zero-weight point still
    belongs somewhere and no cluster has zero mass). InputError for a bad shape or values."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or weights.shape != (n,):
        raise InputError(f"k-means weights must be a tensor of shape ({n},), got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    w = weights.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise InputError("k-means weights must be finite, >= 0 and not all zero")
    return (w + 1e-9 * w.mean()).float()


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, backend: str = "auto", device=None,
           max_iter: int = DEFAULT_MAX_ITER, n_init: int = DEFAULT_N_INIT, init: str | None = None,
           weights: torch.Tensor | None = None) -> KMeansResult:
    """Cluster the rows of ``x`` [n, d] into ``k`` non-empty clusters.

    ``weights`` [n] (>= 0, optional): weighted k-means, minimising ``sum_i w_i ||x_i - c(i)||^2``;
    seeding draws and centroids are weighted by it, and ``centroids``/``inertia`` are weighted.

    ``backend`` is "auto", "faiss" or "torch" (see :func:`resolve_backend`); ``n_init`` runs with
    seeds seed, seed+1, ... and keeps the lowest inertia. ``init`` is the seeding, "greedy"
    (greedy k-means++) or "kmeans-parallel" (k-means||); None means ``DEFAULT_INIT``. Same input,
    seed, init and backend give the same labels. Raises InputError on bad k, input or names.
    """
    start = time.perf_counter()
    _check_x(x, 2)
    k = _check_k(k, x.shape[0])
    _check_iters(max_iter, n_init)
    init = check_init(init)
    w_cpu = _check_weights(weights, x.shape[0])
    name, dev = _resolve(backend, device)
    x_cpu = x.detach().to("cpu", torch.float32).contiguous()
    xd = x_cpu.to(dev)[None]  # [1, n, d] on the compute device
    wd = None if w_cpu is None else w_cpu.to(dev)[None]
    sq = (xd * xd).sum(2)
    tol = _tolerance(xd)
    best = None
    for run in range(n_init):
        gen = torch.Generator(device=dev).manual_seed(seed + run)
        c = _seed(xd, sq, k, gen, init, wd)
        if name.startswith("faiss"):
            c, iters = _faiss_lloyd(xd[0], c[0], max_iter, seed + run, dev, float(tol[0]), w_cpu)
            c = c.to(dev)[None]
        else:
            c, iters = _lloyd(xd, sq, c, max_iter, tol, wd)
            iters = int(iters[0])
        labels, centroids, inertia = _finish(x_cpu, _assign(xd, sq, c)[0][0], k, w_cpu)
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia, iters)
    labels, centroids, inertia, iters = best
    return KMeansResult(labels, centroids, inertia, time.perf_counter() - start, name, iters)


def kmeans_batched(xs: torch.Tensor, k: int, *, seed: int = 0, device=None,
                   max_iter: int = DEFAULT_MAX_ITER, init: str | None = None) -> list[KMeansResult]:
    """Cluster B independent problems ``xs`` [B, n, d] at once with torch (e.g. MoE experts).

    Same seeding, Lloyd and finish as ``kmeans(..., backend="torch")``, batched with bmm.
    Each result's ``seconds`` is the wall time of the whole batch.
    """
    start = time.perf_counter()
    _check_x(xs, 3)
    k = _check_k(k, xs.shape[1])
    _check_iters(max_iter)
    init = check_init(init)
    name, dev = _resolve("torch", device)
    x_cpu = xs.detach().to("cpu", torch.float32).contiguous()
    xd = x_cpu.to(dev)
    sq = (xd * xd).sum(2)
    gen = torch.Generator(device=dev).manual_seed(seed)
    c = _seed(xd, sq, k, gen, init)
    c, iters = _lloyd(xd, sq, c, max_iter, _tolerance(xd))
    labels = _assign(xd, sq, c)[0].cpu()
    iters = iters.tolist()
    finished = [_finish(x_cpu[b], labels[b], k) for b in range(xs.shape[0])]
    seconds = time.perf_counter() - start
    return [KMeansResult(lab, cen, ine, seconds, name, it) for (lab, cen, ine), it in zip(finished, iters)]
