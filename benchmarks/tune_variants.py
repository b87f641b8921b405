"""Compare `tune` loss variants on one fused decoder: perplexity before/after and seconds per variant.

Each variant starts from the same fused checkpoint, tunes on the first --rows sentences of --data
with the same budget, and is measured with the `mlpfuse eval` protocol on --eval (512-token
windows, the first 4,096 tokens). One JSON line per variant is appended to --json as it finishes.

    PYTHONPATH=. python benchmarks/tune_variants.py /tmp/k-f4 --teacher /tmp/smol/smollm2-135m \
        --variants "mse:lr=1e-4" "variance:lr=1e-4" "variance:lr=1e-4,ftw=0" --json runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mlpfuse.checkpoints.modeling import load
from mlpfuse.data import read_table
from mlpfuse.runtime import load_tokenizer
from mlpfuse.train.evaluate import perplexity
from mlpfuse.train.tune import TuneSettings, pack_texts, tune_model

KEYS = {"lr": ("lr", float), "ftw": ("first_token_weight", float), "kl": ("kl_weight", float),
        "t": ("kl_temperature", float), "steps": ("max_steps", int), "bs": ("batch_size", int),
        "pack": ("pack", int), "len": ("max_length", int)}


def parse(variant: str, base: dict) -> TuneSettings:
    """``LOSS:key=value,...`` with LOSS variance|mse and keys lr, ftw, kl, t, steps, bs."""
    loss, _, rest = variant.partition(":")
    values = dict(base, layer_loss=loss)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        name, kind = KEYS[key]
        values[name] = kind(value)
    return TuneSettings(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fused")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", default="../shared/data/sst2/train.tsv")
    parser.add_argument("--eval", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--reference", action="store_true", help="also measure the teacher and the untuned student")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.fused)
    texts = read_table(args.data, limit=args.rows).texts("sentence")
    dev = read_table(args.eval).texts("sentence")
    teacher = load(args.teacher, task="causal-lm").float().eval()
    base = {"batch_size": args.batch_size, "max_length": args.max_length, "save_every": 0, "device": "cpu", "eval_rows": 0}

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    if args.reference:
        start = time.perf_counter()
        record({"variant": "teacher", "perplexity": perplexity(teacher, tokenizer, dev).perplexity,
                "eval_seconds": time.perf_counter() - start})
        student = load(args.fused, task="causal-lm").float()
        record({"variant": "fused, untuned", "perplexity": perplexity(student, tokenizer, dev).perplexity})
    for variant in args.variants:
        settings = parse(variant, base)
        student = load(args.fused, task="causal-lm").float()
        start = time.perf_counter()
        rows = pack_texts(tokenizer, texts, settings.max_length) if settings.pack else texts
        result = tune_model(student, teacher, tokenizer, rows, settings)
        seconds = time.perf_counter() - start
        record({"variant": variant, "perplexity": perplexity(student, tokenizer, dev).perplexity,
                "tune_seconds": round(seconds, 1), "steps": result["steps"], "rows": len(texts), "sequences": len(rows),
                "initial_loss": result["initial_loss"], "final_loss": result["final_loss"]})


if __name__ == "__main__":
    main()
