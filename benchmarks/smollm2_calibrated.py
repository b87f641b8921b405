"""Preview of data-aware fusion (mlpfuse.methods.calibrated) on SmolLM2-135M, before it is wired into ``fuse``.

Loads the plain HF directory written by ``benchmarks/smollm2.py``, and fuses the chosen layers one
after the other (each layer's calibration inputs come from the model with the layers before it
already fused, as the sequential calibration pass of issue 11 will), replacing each LLaMA MLP by
its fused form in memory; then measures perplexity with ``mlpfuse eval``'s protocol. Calibration
text: the first ``--calibration-tokens`` tokens of the SST-2 train sentences (newline-joined), in
``--max-length`` windows. LLaMA-specific on purpose (a benchmark, not library code).

    python benchmarks/smollm2_calibrated.py /tmp/smollm2/smollm2-135m --layers 29 --ratio 0.5 --protect 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.data import read_table
from mlpfuse.methods.calibrated import calibrated_fusion
from mlpfuse.train.evaluate import perplexity, token_ids, windows_of


class FusedMLP(torch.nn.Module):
    """A gated MLP in the standard form, with P as a buffer (the forward of MLPWeights)."""

    def __init__(self, mlp: MLPWeights, activation):
        super().__init__()
        self.gate = torch.nn.Parameter(mlp.w_gate.float())
        self.up = torch.nn.Parameter(mlp.w_in.float())
        self.down = torch.nn.Parameter(mlp.w_out.float())
        self.register_buffer("scale", mlp.scale.float())
        self.activation = activation

    def forward(self, x):
        hidden = self.activation(x @ self.gate.T) * (x @ self.up.T)
        return (hidden * self.scale) @ self.down.T


def mlp_inputs(model, layer: int, windows: list[list[int]]) -> torch.Tensor:
    """The inputs [tokens, hidden] of ``model.model.layers[layer].mlp`` on the calibration windows."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for window in windows:
                model.model(input_ids=torch.tensor([window]))  # the decoder only: no vocabulary projection
    finally:
        handle.remove()
    return torch.cat(seen)


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--layers", default="29", help="Comma list or A-B range.")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--protect", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--calibration", default="../shared/data/sst2/train.tsv")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--data", default="../shared/data/sst2/dev.tsv")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--limit-tokens", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start, _, end = args.layers.partition("-")
    layers = list(range(int(start), int(end) + 1)) if end else [int(v) for v in args.layers.split(",")]
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calibration = windows_of(token_ids(tokenizer, read_table(args.calibration).texts("sentence"),
                                       args.calibration_tokens), args.max_length)
    stats = {}
    for layer in layers:
        block = model.model.layers[layer].mlp
        mlp = MLPWeights(w_in=block.up_proj.weight.detach(), w_out=block.down_proj.weight.detach(),
                         w_gate=block.gate_proj.weight.detach())
        x = mlp_inputs(model, layer, calibration)
        k = round(mlp.width * args.ratio)
        fused = calibrated_fusion(mlp, k, x, torch.nn.functional.silu, protect=args.protect, alpha=args.alpha,
                                  refit=not args.no_refit)
        model.model.layers[layer].mlp = FusedMLP(fused, torch.nn.functional.silu)
        stats[layer] = fused.stats
        print(f"layer {layer}: k {k}, {fused.stats}", flush=True)
    result = perplexity(model, tokenizer, read_table(args.data).texts("sentence"), args.max_length, args.limit_tokens)
    report = {"layers": layers, "ratio": args.ratio, "protect": args.protect, "alpha": args.alpha,
              "refit": not args.no_refit, "calibration_tokens": args.calibration_tokens, "stats": stats,
              "seconds": round(time.perf_counter() - started, 1), **result.as_dict()}
    print(json.dumps({k: v for k, v in report.items() if k != "stats"}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
