"""`mlpfuse tune` with the logit KL at a 262k vocabulary: seconds and peak RSS of a few steps.

Builds a tiny-hidden LLaMA (hidden 64, 2 layers, MLP width 256, tied embeddings) with a
262,144-token vocabulary (the bundled MiniLM tokenizer; its ids are a small part of that
vocabulary, but the logits span all of it), saves it, fuses it with ``mlpfuse fuse --ratio 0.5``,
then times ``mlpfuse tune`` (default KL weight 1 for a causal LM, no held-out report) under
``/usr/bin/time -f "%e s %M KB %U %S"`` (wall seconds, peak RSS, user and system CPU seconds).
The hidden size is tiny so that the output head (vocab x hidden) and the [tokens, vocab] logits
are what the run spends its time and memory on (``--kl-weight 0`` times the run without them).
One JSON line per run is appended to --json with the command, seconds, peak RSS, the load average,
the date and the commit of the mlpfuse that ran: the one PYTHONPATH imports (point it at another
checkout, e.g. a ``git worktree`` of an older commit, to time that one).

    PYTHONPATH=. python benchmarks/tune_large_vocab.py /tmp/tlv --data ../shared/data/sst2/train.tsv \
        --steps 5 --batch-size 4 --max-length 128 --json benchmarks/results/tune_large_vocab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 262_144


def child_env() -> dict:
    """This environment with PYTHONPATH made absolute (the commands run in another directory)."""
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1"}


def build(directory: Path, vocab: int) -> tuple[Path, Path]:
    """The original model and its fused copy (``--ratio 0.5``), each built once."""
    import torch
    import transformers

    from mlpfuse.checkpoints.source import bundled_model_path

    original, fused = directory / "original", directory / "fused"
    if not original.exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(bundled_model_path()))
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(original)
        tokenizer.save_pretrained(original)
    if not fused.exists():
        subprocess.run([sys.executable, "-m", "mlpfuse", "fuse", str(original), "--ratio", "0.5", "-o", str(fused)],
                       check=True, cwd=directory, env=child_env())
    return original, fused


def timed_tune(original: Path, fused: Path, data: str, args) -> dict:
    """Run ``mlpfuse tune`` under /usr/bin/time; its seconds, peak RSS and the command."""
    command = ["/usr/bin/time", "-f", "%e s %M KB %U %S", sys.executable, "-m", "mlpfuse", "tune", str(fused),
               "--teacher", str(original), "--data", data, "--limit", str(args.rows), "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--eval-rows", "0",
               "--kl-weight", str(args.kl_weight),
               "-o", str(args.directory / "tuned"), "--overwrite"]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    # run outside any checkout: `python -m` puts the working directory first on sys.path
    result = subprocess.run(command, capture_output=True, text=True, cwd=args.directory,
                            env=child_env())
    if result.returncode:
        raise SystemExit(result.stdout + result.stderr)
    seconds, _, kilobytes, _, user, system = result.stderr.strip().splitlines()[-1].split()
    return {"command": " ".join(["/usr/bin/time", "-f", "'%e s %M KB %U %S'", "python"] + command[4:]),
            "seconds": float(seconds), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_mb": round(int(kilobytes) / 1024), "load_before": load_before,
            "load_after": Path("/proc/loadavg").read_text().split()[:3]}


def mlpfuse_commit() -> str:
    """The commit of the checkout whose mlpfuse package this Python imports (+ if it has changes)."""
    import mlpfuse

    root = Path(mlpfuse.__file__).parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="Where the models and the tuned output go.")
    parser.add_argument("--data", required=True, help="A text table (e.g. SST-2's train.tsv).")
    parser.add_argument("--rows", type=int, default=2000, help="Rows of --data to pack into windows.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--kl-weight", type=float, default=1.0, help="tune's --kl-weight (1: the causal-LM default).")
    parser.add_argument("--label", default="", help="Recorded with the result (e.g. before / after).")
    parser.add_argument("--json", type=Path, help="Append the result as one JSON line.")
    args = parser.parse_args()
    args.directory = args.directory.resolve()
    args.directory.mkdir(parents=True, exist_ok=True)
    original, fused = build(args.directory, args.vocab)
    data = str(Path(args.data).resolve())
    record = {"label": args.label, "vocab": args.vocab, "kl_weight": args.kl_weight, "steps": args.steps,
              "batch_size": args.batch_size,
              "max_length": args.max_length, "machine": f"{os.cpu_count()}-core CPU",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "commit": mlpfuse_commit(),
              **timed_tune(original, fused, data, args)}
    print(json.dumps(record))
    if args.json:
        with args.json.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
