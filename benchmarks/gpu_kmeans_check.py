"""Short GPU check of mlpfuse.compress.kmeans (< 2 minutes on an H100/H200). Run from the repo root:

    PYTHONPATH=. python benchmarks/gpu_kmeans_check.py --features l3.pt --json gpu_kmeans.json

(make l3.pt on a machine with the bundled model: benchmarks/kmeans_bench.py --skip-sklearn
--save-features l3.pt). It times, on CUDA: the real layer (torch-cuda, and faiss-gpu if faiss has
GPU support), a synthetic 3072 x 1537 matrix at k=768 (reference: plain torch k-means++ and 50
Lloyd steps took 0.55 s on an H100), and kmeans_batched on 64 experts of 1024 x 513 at k=256
against a loop of kmeans calls. It also checks that the seeding loop never waits on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

import torch

try:
    from mlpfuse.compress import kmeans as km
except Exception:  # the package __init__ pulls in transformers & co.; kmeans.py needs only torch
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mlpfuse")
    pkg = types.ModuleType("mlpfuse")
    pkg.__path__ = [root]
    sys.modules["mlpfuse"] = pkg
    from mlpfuse.compress import kmeans as km


def timed(fn, repeat):
    fn()  # warm-up
    out, secs = [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out.append(fn())
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    return out, statistics.median(secs)


def seeding_phase(x, k, dev, repeat=3):
    """Seconds for the greedy k-means++ seeding alone, and whether it synchronises with the host."""
    xd = x.to(dev, torch.float32)[None]
    sq = (xd * xd).sum(2)
    _, sec = timed(lambda: km._kmeanspp(xd, sq, k, torch.Generator(device=dev).manual_seed(0)), repeat)
    torch.cuda.set_sync_debug_mode("error")
    try:
        km._kmeanspp(xd, sq, k, torch.Generator(device=dev).manual_seed(0))
        syncs = False
    except RuntimeError:
        syncs = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"seeding_seconds": sec, "seeding_syncs_host": syncs}


def single(name, x, k, backend, dev, repeat, **kw):
    results, sec = timed(lambda: km.kmeans(x, k, seed=0, backend=backend, device=dev, **kw), repeat)
    r = results[-1]
    out = {"case": name, "backend": r.backend, "n": x.shape[0], "d": x.shape[1], "k": k, "seconds": sec,
           "inertia": r.inertia, "iterations": r.iterations, **kw}
    print(f"{name:<44} {r.backend:<11} {sec:8.3f} s  inertia {r.inertia:12.1f}  iters {r.iterations}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU timings of mlpfuse.compress.kmeans")
    p.add_argument("--features", help=".pt feature matrix of the real layer (kmeans_bench.py --save-features)")
    p.add_argument("--k", type=int, default=384)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    dev = torch.device("cuda", torch.cuda.current_device())
    avail = km.available_backends()
    info = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
            "backends": avail, "rows": []}
    print(f"{info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, backends {avail}")
    rows = info["rows"]
    gpu_backends = [b for b, name in (("torch", "torch-cuda"), ("faiss", "faiss-gpu")) if avail[name]]

    if args.features:
        x = torch.load(args.features).float()
        for b in gpu_backends:
            rows.append(single(f"real layer {tuple(x.shape)} k={args.k}", x, args.k, b, dev, args.repeat))
        info["seeding_real_layer"] = seeding_phase(x, args.k, dev)
        print(f"  seeding alone: {info['seeding_real_layer']}")
    else:
        print("no --features: skipping the real layer")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3072, 1537, generator=g)
    for b in gpu_backends:
        rows.append(single("synthetic 3072x1537 k=768, max_iter=50", x, 768, b, dev, args.repeat, max_iter=50))
        rows.append(single("synthetic 3072x1537 k=768, default", x, 768, b, dev, args.repeat))
    info["seeding_synthetic"] = seeding_phase(x, 768, dev)
    print(f"  seeding alone: {info['seeding_synthetic']}")

    xs = torch.randn(64, 1024, 513, generator=g)
    batched, sec_b = timed(lambda: km.kmeans_batched(xs, 256, seed=0, device=dev), 1)
    looped, sec_l = timed(lambda: [km.kmeans(x, 256, seed=0, backend="torch", device=dev) for x in xs], 1)
    ib = statistics.mean(r.inertia for r in batched[-1])
    il = statistics.mean(r.inertia for r in looped[-1])
    rows.append({"case": "64 experts 1024x513 k=256", "batched_seconds": sec_b, "loop_seconds": sec_l,
                 "speedup": sec_l / sec_b, "batched_mean_inertia": ib, "loop_mean_inertia": il})
    print(f"64 experts 1024x513 k=256: batched {sec_b:.3f} s, loop {sec_l:.3f} s ({sec_l / sec_b:.1f}x); "
          f"mean inertia batched {ib:.1f} vs loop {il:.1f} ({100 * (ib / il - 1):+.2f}%)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
