"""LoRA on SST-2 of a tuned checkpoint, with the protocol of finetune_decoder.py (one row, several seeds).

Issue 21: does ``tune`` (layer-wise distillation against the original on unlabeled text) before LoRA
close the gap to the original? Tune first with the command line, then run this script:

    head -1 shared/data/sst2/train.tsv > tune4096.tsv   # then 4,096 sentences of SST-2 train (seeded sample)
    mlpfuse tune ftbench/fusion-all-0.75 --teacher smollm2-dir --data tune4096.tsv \
        --eval-data shared/data/sst2/dev.tsv --eval-rows 256 --batch-size 8 --max-length 128 -o fusion-tuned
    PYTHONPATH=. python benchmarks/finetune_decoder_tuned.py fusion-tuned --work ftbench --json tuned.json --seeds 0 1 2

``--work``: the folder finetune_decoder.py wrote (its train.tsv sample is reused, so the rows compare).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_decoder as protocol_of  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="The tuned (or any) checkpoint to fine-tune.")
    parser.add_argument("--work", required=True, help="finetune_decoder.py's --work folder (train.tsv).")
    parser.add_argument("--json", required=True, help="Results (resumed when present).")
    parser.add_argument("--dev", default=str(protocol_of.DATA / "dev.tsv"))
    parser.add_argument("--preset", choices=sorted(protocol_of.PRESETS), default="cpu-session")
    parser.add_argument("--row", default="fusion all@0.75 + tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    protocol = dict(protocol_of.PRESETS[args.preset])
    files = {"train": Path(args.work) / "train.tsv", "dev": Path(args.dev)}
    out = Path(args.json)
    runs = json.loads(out.read_text()) if out.is_file() else []
    for seed in args.seeds:
        if any(r["seed"] == seed for r in runs):
            continue
        start = time.perf_counter()
        metrics = protocol_of.run_one("lora-sst2", args.checkpoint, files, protocol, seed, False)
        runs.append({"task": "lora-sst2", "row": args.row, "seed": seed, "wall_seconds": time.perf_counter() - start,
                     **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        out.write_text(json.dumps(runs, indent=2) + "\n")
        print(f"{args.row} seed {seed}: {100 * metrics['accuracy']:.2f}", flush=True)
    return runs


if __name__ == "__main__":
    main()
