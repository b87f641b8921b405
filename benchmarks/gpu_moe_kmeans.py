"""k-means over the experts of one MoE layer: a loop of per-expert runs vs one batched run.

Each expert's sub-MLPs (I neurons, 3H features for a gated expert) are one small problem; this
times ``kmeans`` in a loop (torch backend, and faiss where installed) against ``kmeans_batched``.

    PYTHONPATH=. python benchmarks/gpu_moe_kmeans.py --json OUT.json            # CUDA if present
    PYTHONPATH=. python benchmarks/gpu_moe_kmeans.py --device cpu --preset small --json OUT.json

Presets: ``small`` (CPU: 8 experts, I=256, H=128, k=64), ``mixtral`` (8 experts, I=14336, H=4096,
k=3584), ``qwen3`` (128 experts, I=768, H=2048, k=192), ``olmoe`` (64 experts, I=1024, H=2048, k=256).
Needs only torch + mlpfuse (faiss optional).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mlpfuse.compress.kmeans import available_backends, kmeans, kmeans_batched

PRESETS = {
    "small": dict(experts=8, width=256, hidden=128, k=64),
    "olmoe": dict(experts=64, width=1024, hidden=2048, k=256),
    "qwen3": dict(experts=128, width=768, hidden=2048, k=192),
    "mixtral": dict(experts=8, width=14336, hidden=4096, k=3584),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(preset: str, device: str, seed: int = 0) -> dict:
    p = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(p["experts"], p["width"], 3 * p["hidden"], generator=gen)
    rows = {}
    for name, fn in (
        ("loop-torch", lambda: [kmeans(x, p["k"], seed=seed, backend="torch", device=device) for x in xs]),
        ("batched-torch", lambda: kmeans_batched(xs, p["k"], seed=seed, device=device)),
    ) + ((("loop-faiss", lambda: [kmeans(x, p["k"], seed=seed, backend="faiss", device=device) for x in xs]),)
         if available_backends()["faiss-gpu" if device.startswith("cuda") else "faiss-cpu"] else ()):
        _sync(device)
        start = time.perf_counter()
        results = fn()
        _sync(device)
        rows[name] = {"seconds": time.perf_counter() - start, "inertia": sum(r.inertia for r in results),
                      "backend": results[0].backend}
    return {"preset": preset, **p, "device": device, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    presets = args.preset or (["olmoe", "qwen3", "mixtral"] if args.device.startswith("cuda") else ["small"])
    runs = [run(name, args.device) for name in presets]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    out = {"device_name": device_name, "torch": torch.__version__, "runs": runs}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
