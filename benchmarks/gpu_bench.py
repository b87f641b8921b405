"""GPU figures for ``mlpfuse bench`` (issue 6): RoBERTa-base and MiniLM shapes, fp32 / bf16, eager / compiled.

Usage (on a CUDA machine, from the repository root; needs torch, transformers, safetensors, pyyaml):

    PYTHONPATH=. python benchmarks/gpu_bench.py OUT_DIR [--budget 240]

Runs the configurations below in one process, cheapest and most important first, and writes one
JSON report per configuration (``OUT_DIR/<name>.json``, the same format as ``mlpfuse bench --json``)
as soon as it finishes, plus ``OUT_DIR/summary.json``. A configuration whose estimated time no
longer fits the budget is skipped (and listed as skipped), so a time limit never loses finished
results. A failing configuration is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from mlpfuse.analysis.bench import BenchSettings, preset_sources, run_bench

B, S = 32, 128
# name, preset, settings, estimated seconds (build + warm-up + compile + timing on an H100)
CONFIGS = [
    ("roberta_fp32_s128", "roberta-base", dict(dtype="fp32"), 25),
    ("roberta_bf16_s128", "roberta-base", dict(dtype="bf16"), 20),
    ("roberta_bf16_s128_foreach_adamw", "roberta-base", dict(dtype="bf16", adamw="foreach"), 20),
    ("roberta_bf16_s64", "roberta-base", dict(dtype="bf16", seq_len=64), 20),
    ("minilm_fp32_s128", "minilm", dict(dtype="fp32"), 12),
    ("minilm_bf16_s128", "minilm", dict(dtype="bf16"), 12),
    ("roberta_bf16_s128_compile", "roberta-base", dict(dtype="bf16", compile=True, inference=False), 120),
    ("roberta_fp32_s128_compile_layers", "roberta-base",
     dict(dtype="fp32", compile=True, compile_scope="layers", inference=False), 60),
    ("roberta_bf16_s64_compile_layers", "roberta-base",
     dict(dtype="bf16", seq_len=64, compile=True, compile_scope="layers", inference=False), 60),
    ("roberta_bf16_s128_cudagraphs_layers", "roberta-base",
     dict(dtype="bf16", compile=True, compile_scope="layers", compile_mode="reduce-overhead", inference=False), 70),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the JSON reports")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for all configurations together")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = {}
    for name, preset, overrides, estimate in CONFIGS:
        left = args.budget - (time.perf_counter() - start)
        if estimate > left:
            summary[name] = {"skipped": f"estimated {estimate}s, {left:.0f}s of the budget left"}
            print(f"{name}: skipped ({left:.0f}s left)", flush=True)
            continue
        settings = BenchSettings(**{"steps": args.steps, "warmup": args.warmup, "batch_size": B, "seq_len": S,
                                    "device": "cuda", **overrides})
        began = time.perf_counter()
        try:
            report = run_bench(preset_sources(preset), settings)
        except Exception as exc:  # record and go on with the next configuration
            traceback.print_exc()
            summary[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        data = report.to_dict()
        (args.out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        fused = report.models[1]
        summary[name] = {k: fused.ratios.get(k) for k in ("train_step", "inference", "peak_memory", "flops")}
        summary[name]["original_step_ms"] = report.models[0].train_step.median * 1e3
        summary[name]["fused_step_ms"] = fused.train_step.median * 1e3
        summary[name]["seconds"] = time.perf_counter() - began
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[name].items() if v is not None), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
