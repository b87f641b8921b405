"""Seeding side by side: greedy k-means++ against k-means|| (``init="kmeans-parallel"``).

    PYTHONPATH=. python benchmarks/seeding_bench.py --json benchmarks/results/seeding_cpu.json

1. Quality: MiniLM layer 3 neurons (1536 x 769), k=384, torch-cpu, ``--seeds`` seeds per seeding:
   inertia after Lloyd (as ``kmeans`` returns it) and wall time.
2. Speed: a synthetic layer shaped like the issue's (8192 sub-MLPs x 6145, k=4096; random normal
   rows), seeding only. Greedy runs its first N steps for N = 1/blocks .. all of ``--greedy-steps``
   (seconds per step for each N shows the per-step time is flat) and the median seconds per step
   is extrapolated linearly to k-1 steps; k-means|| runs in full.
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


def quality(x, k, seeds):
    rows = {}
    for init in km.INITS:
        km.kmeans(x, k, seed=0, backend="torch", device="cpu", init=init)  # warm-up
        res = [km.kmeans(x, k, seed=s, backend="torch", device="cpu", init=init) for s in range(seeds)]
        rows[init] = {"inertia_mean": statistics.mean(r.inertia for r in res),
                      "inertia_worst": max(r.inertia for r in res),
                      "inertia_all": [r.inertia for r in res],
                      "seconds_median": statistics.median(r.seconds for r in res)}
    g, p = rows["greedy"], rows["kmeans-parallel"]
    p["gap_vs_greedy_pct"] = 100 * (p["inertia_mean"] / g["inertia_mean"] - 1)
    return rows


def speed(n, d, k, greedy_steps, blocks):
    x = (torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.02)[None]
    sq = (x * x).sum(2)
    per_step = {}
    for b in range(1, blocks + 1):  # first N steps for growing N: a flat seconds/step shows the steps cost the same
        steps = b * greedy_steps // blocks
        t = time.perf_counter()
        km._kmeanspp(x, sq, k, torch.Generator().manual_seed(0), steps=steps + 1)
        per_step[steps] = (time.perf_counter() - t) / steps
    greedy_est = statistics.median(per_step.values()) * (k - 1)
    t = time.perf_counter()
    km._kmeans_parallel(x, sq, k, torch.Generator().manual_seed(0))
    par = time.perf_counter() - t
    return {"n": n, "d": d, "k": k, "greedy_seconds_per_step_first_n": per_step,
            "greedy_seconds_estimated": greedy_est, "parallel_seconds": par, "speedup": greedy_est / par}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=6145)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--greedy-steps", type=int, default=40)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = {"date": datetime.datetime.utcnow().isoformat(timespec="minutes") + "Z", "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "rounds": km.PARALLEL_ROUNDS, "oversampling": km.PARALLEL_OVERSAMPLING}
    if not args.skip_quality:
        from kmeans_bench import layer_features

        out["minilm_layer3_k384"] = q = quality(layer_features(3), 384, args.seeds)
        for init, r in q.items():
            print(f"MiniLM L3 k=384 {init:<16} inertia mean {r['inertia_mean']:.1f} worst {r['inertia_worst']:.1f} "
                  f"seconds {r['seconds_median']:.3f}")
        print(f"gap k-means|| vs greedy: {q['kmeans-parallel']['gap_vs_greedy_pct']:+.2f}%")
    out["synthetic"] = s = speed(args.n, args.d, args.k, args.greedy_steps, args.blocks)
    print(f"synthetic {args.n}x{args.d} k={args.k}: greedy s/step over the first N steps "
          f"{ {n: round(v, 3) for n, v in s['greedy_seconds_per_step_first_n'].items()} } -> {s['greedy_seconds_estimated']:.0f} s "
          f"estimated; k-means|| {s['parallel_seconds']:.1f} s; speed-up {s['speedup']:.1f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
