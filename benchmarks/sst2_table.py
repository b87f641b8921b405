"""The SST-2 accuracy table: bundled MiniLM, MLP layers 2-5 fused 1536 -> 384, fine-tuned and evaluated on dev.

Rows: full model, every compression method the registry lists (fusion, cluster, and svd / sketch /
prune when present) and fusion + layer-wise tuning. Each row is fine-tuned with the same protocol
and several seeds; the table gives mean and std of dev accuracy and F1.

    PYTHONPATH=. python benchmarks/sst2_table.py --preset cpu --json runs/sst2_cpu.json
    PYTHONPATH=. python benchmarks/sst2_table.py --preset gpu --json runs/sst2_gpu.json   # on a GPU

Results are written to the JSON file after every run, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint  # noqa: E402
from mlpfuse.methods import method_names  # noqa: E402
from mlpfuse.train.finetune import FinetuneSettings, finetune  # noqa: E402
from mlpfuse.train.tune import TuneSettings, tune_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
# ../shared/data/sst2 beside the repository, or shared/data/sst2 inside it (as on a lent GPU machine)
DATA = next((d for d in (HERE.parent / "shared" / "data" / "sst2", HERE.parent.parent / "shared" / "data" / "sst2")
             if d.is_dir()), HERE.parent.parent / "shared" / "data" / "sst2")
BASELINES = ("cluster", "svd", "sketch", "prune")
PRESETS = {
    # 2-core shared CPU: a sample and a higher learning rate: ~128 steps a run, ~25 minutes in all.
    "cpu": dict(train_rows=2048, max_length=64, epochs=1.0, lr=2e-4, tune_lr=1e-4, batch_size=16,
                seeds=[0, 1, 2], baseline_seeds=[0, 1], bf16=False),
    # One H100: a large sample, 3 seeds for every row, the paper's batch size and warm-up.
    "gpu": dict(train_rows=12000, max_length=64, epochs=1.0, lr=1e-4, tune_lr=1e-4, batch_size=32,
                seeds=[0, 1, 2], baseline_seeds=[0, 1, 2], bf16=True),
}


def sample_rows(source: Path, rows: int, seed: int, target: Path) -> int:
    """Write a seeded random sample of ``rows`` data rows of a TSV to ``target``; returns the count."""
    header, *lines = source.read_text(encoding="utf-8").splitlines()
    if rows and rows < len(lines):
        lines = random.Random(seed).sample(lines, rows)
    target.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return len(lines)


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--train", default=str(DATA / "train.tsv"))
    parser.add_argument("--dev", default=str(DATA / "dev.tsv"))
    parser.add_argument("--train-rows", type=int, help="Training sample size (0 = all).")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--baseline-seeds", type=int, nargs="+", help="Seeds for svd/sketch/prune/mmd rows.")
    parser.add_argument("--methods", nargs="+", help="Rows to run (default: full, fusion, fusion+tune, baselines).")
    parser.add_argument("--layers", default="2-5")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--work", help="Folder for the fused checkpoints (default: a temporary folder).")
    args = parser.parse_args(argv)
    protocol = dict(PRESETS[args.preset])
    for key in ("train_rows", "seeds", "baseline_seeds", "lr", "epochs", "max_length", "batch_size"):
        if getattr(args, key) is not None:
            protocol[key] = getattr(args, key)
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = protocol["bf16"] and device == "cuda" and torch.cuda.is_bf16_supported()
    available = set(method_names())
    rows = args.methods or ["full", "fusion", "fusion+tune", *[m for m in BASELINES if m in available]]
    main_rows = {"full", "fusion", "fusion+tune", "cluster"}

    results = {"protocol": {**protocol, "bf16": bf16, "layers": args.layers, "dim": args.dim, "preset": args.preset,
                            "train": args.train, "dev": args.dev},
               "machine": {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                           "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__},
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "runs": [], "rows": {}, "prepare_seconds": {}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="sst2-table-", dir=args.work) as work:
        work = Path(work)
        train_file = work / "train.tsv"
        results["protocol"]["train_rows_used"] = sample_rows(Path(args.train), protocol["train_rows"], 0, train_file)
        checkpoints = {"full": "minilm"}
        for row in rows:
            method = "fusion" if row == "fusion+tune" else row
            if row == "full" or method in checkpoints:
                continue
            start = time.perf_counter()
            fuse_checkpoint("minilm", work / method, FuseSettings(layers=args.layers, dim=args.dim, method=method,
                                                                  device=device if device == "cuda" else None))
            checkpoints[method] = str(work / method)
            results["prepare_seconds"][method] = time.perf_counter() - start
        if "fusion+tune" in rows:
            start = time.perf_counter()
            report = tune_checkpoint(checkpoints["fusion"], "minilm", str(train_file), work / "fusion-tune",
                                     TuneSettings(lr=protocol["tune_lr"], batch_size=protocol["batch_size"],
                                                  max_length=protocol["max_length"], save_every=0))
            checkpoints["fusion+tune"] = str(work / "fusion-tune")
            results["prepare_seconds"]["fusion+tune"] = time.perf_counter() - start
            results["tuning"] = {"initial_loss": report.initial_loss, "final_loss": report.final_loss, "steps": report.steps}
            print(f"tuned: loss {report.initial_loss:.4f} -> {report.final_loss:.4f} in {report.steps} steps", flush=True)
        save()
        # seed-major: every row gets seed 0 before any row gets seed 1, so a cut-short run stays comparable
        for seed in dict.fromkeys(protocol["seeds"] + protocol["baseline_seeds"]):
            for row in rows:
                if seed not in (protocol["seeds"] if row in main_rows else protocol["baseline_seeds"]):
                    continue
                settings = FinetuneSettings(epochs=protocol["epochs"], lr=protocol["lr"], batch_size=protocol["batch_size"],
                                            eval_batch_size=128, max_length=protocol["max_length"], seed=seed, bf16=bf16)
                report = finetune(checkpoints[row], str(train_file), args.dev, None, settings)
                metrics = report["metrics"]
                results["runs"].append({"row": row, "seed": seed, "parameters": report["parameters"], **metrics})
                print(f"{row:12s} seed {seed}: accuracy {100 * metrics['accuracy']:.2f} f1 {100 * metrics['f1']:.2f} "
                      f"({metrics['train_seconds']:.0f}s)", flush=True)
                runs = [r for r in results["runs"] if r["row"] == row]
                results["rows"][row] = {"accuracy": summarise([100 * r["accuracy"] for r in runs]),
                                        "f1": summarise([100 * r["f1"] for r in runs]),
                                        "parameters": report["parameters"],
                                        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs)}
                save()
    print(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    lines = ["| row | params | dev accuracy (mean ± std) | dev F1 (mean ± std) | seeds | train s/run |",
             "|---|---:|---:|---:|---:|---:|"]
    for row, data in results["rows"].items():
        acc, f1 = data["accuracy"], data["f1"]
        lines.append(f"| {row} | {data['parameters']:,} | {acc['mean']:.2f} ± {acc['std']:.2f} | "
                     f"{f1['mean']:.2f} ± {f1['std']:.2f} | {acc['n']} | {data['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
