"""The whole workflow through the Python API: fuse -> tune -> fine-tune -> export -> plain transformers.

    python examples/fuse_tune_finetune_export.py --train ../shared/data/sst2/train.tsv \
        --eval ../shared/data/sst2/dev.tsv --out runs/minilm-sst2

Defaults fuse the bundled all-MiniLM-L6-v2 (every layer to 384 neurons: a plain BERT config holds
one MLP width, so fusing all layers to one width exports without padding) and train on a few hundred
examples so it runs on a laptop CPU in minutes; raise --limit/--steps (or drop them) for real runs.
Every step writes a checkpoint directory under --out; the last one loads with plain transformers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import mlpfuse
from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.deploy.export import export_checkpoint
from mlpfuse.train.finetune import FinetuneSettings, finetune
from mlpfuse.train.tune import TuneSettings, tune_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="checkpoint directory, hub id or 'minilm'")
    parser.add_argument("--train", required=True, help="TSV with columns sentence, label")
    parser.add_argument("--eval", required=True, help="TSV with columns sentence, label")
    parser.add_argument("--out", required=True, help="directory for the four checkpoints")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--limit", type=int, default=256, help="training examples used by tune and fine-tune")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of tune and of fine-tune")
    args = parser.parse_args()
    out = Path(args.out)

    # 1. one-shot MLP Fusion (k-means over neurons, P kept as a buffer)
    fused = fuse_checkpoint(args.model, out / "fused", FuseSettings(layers=args.layers, dim=args.dim, seed=0))
    print(f"fused: parameters {fused.parameters['before']:,} -> {fused.parameters['after']:,}")

    # 2. layer-wise task-specific tuning, the original model as teacher
    tuned = tune_checkpoint(str(out / "fused"), args.model, args.train, out / "tuned",
                            TuneSettings(limit=args.limit, max_steps=args.steps, batch_size=16))
    print(f"tuned: {tuned.steps} steps, last loss {tuned.losses[-1]:.4g}")

    # 3. fine-tune on the task (the fused format is kept: P still shapes the training dynamics)
    finetuned = finetune(str(out / "tuned"), args.train, args.eval, out / "finetuned",
                       FinetuneSettings(epochs=1, max_steps=args.steps, batch_size=16, limit_train=args.limit,
                                        limit_eval=args.limit))
    print(f"fine-tuned: dev accuracy {finetuned['metrics']['accuracy']:.3f} after {finetuned['metrics']['train_steps']} steps")

    # 4. export: P folded into the weights, a plain BERT checkpoint (no remote code)
    report = export_checkpoint(str(out / "finetuned"), out / "exported")
    print(f"exported: {report.architecture} with {report.widths}, max |export - fused| {report.max_abs_diff:.2g}")

    # 5. deploy: plain transformers, and the same predictions as the fused model
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "exported")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(out / "exported").eval()
    fused_model = mlpfuse.load(out / "finetuned", task="sequence-classification").eval()
    batch = tokenizer(["a gripping, beautifully made film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        difference = (plain(**batch).logits - fused_model(**batch).logits).abs().max().item()
    print(f"plain transformers load: {type(plain).__name__}, logits equal the fused model's (max diff {difference:.2g})")


if __name__ == "__main__":
    main()
