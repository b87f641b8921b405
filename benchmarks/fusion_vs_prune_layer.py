"""One SmolLM2 MLP in isolation: calibrated prune vs calibrated fusion variants (held-out output error).

Captures the inputs of ``model.layers[L].mlp`` of the plain HF directory written by
``benchmarks/smollm2.py`` on SST-2 train text (the first ``--calibration`` tokens calibrate, the
last ``--held-out`` tokens measure), then compares the relative error ``||y_c - y|| / ||y||`` of
calibrated prune, calibrated fusion (several ``protect`` values) and "protect the most important,
cluster the rest into ``c`` clusters" for several ``c``. LLaMA module names on purpose (a
benchmark, not library code). Results: docs/llm.md.

    python benchmarks/fusion_vs_prune_layer.py /tmp/smol/smollm2-135m --layer 27
"""

from __future__ import annotations

import argparse

import torch

from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.data import read_table
from mlpfuse.methods import calibrated
from mlpfuse.train.evaluate import token_ids, windows_of


def mlp_inputs(model, layer: int, windows) -> torch.Tensor:
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    with torch.no_grad():
        for window in windows:
            model.model(input_ids=torch.tensor([window]))
    handle.remove()
    return torch.cat(seen).double()


def clustered_rest(mlp, x, act, k, clusters, score, h, target):
    """Keep the ``k - clusters`` most important neurons; k-means the rest (unit-norm weight rows)."""
    order = torch.argsort(-score, stable=True)
    kept, rest = order[:k - clusters], order[k - clusters:]
    features = mlp.neuron_features().double()[rest]
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sub = calibrated.weighted_kmeans(features, torch.ones(len(rest), dtype=torch.float64), clusters, max_iter=30)
    labels = torch.empty(mlp.width, dtype=torch.long)
    labels[kept] = torch.arange(k - clusters)
    labels[rest] = sub + k - clusters
    weights = score + 1e-12
    fused = mlp.map_neurons(lambda t: calibrated.weighted_average(t, labels, weights, k, 0),
                            lambda w: calibrated.weighted_average(w, labels, weights, k, 1))
    fused.scale = torch.bincount(labels, minlength=k).float()
    return calibrated.ridge_refit(fused, x, target, act)


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--layer", type=int, default=27)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--data", default="../shared/data/sst2/train.tsv")
    parser.add_argument("--calibration", type=int, default=4096)
    parser.add_argument("--held-out", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    total = args.calibration + args.held_out
    x = mlp_inputs(model, args.layer, windows_of(token_ids(tokenizer, read_table(args.data).texts("sentence"), total), 256))
    cal, held = x[:args.calibration], x[-args.held_out:]
    block = model.model.layers[args.layer].mlp
    mlp = MLPWeights(w_in=block.up_proj.weight.detach().double(), w_out=block.down_proj.weight.detach().double(),
                     w_gate=block.gate_proj.weight.detach().double())
    act = torch.nn.functional.silu
    y = mlp.forward(held, act)

    def error(compressed) -> float:
        return float((compressed.forward(held, act) - y).norm() / y.norm())

    k = round(mlp.width * args.ratio)
    h = calibrated.neuron_activations(mlp, cal, act)
    score, target = calibrated.importance(mlp, h), calibrated.original_output(mlp, h)
    print(f"calibrated prune: {error(calibrated.calibrated_prune(mlp, k, cal, act)):.4f}", flush=True)
    for protect in (0, 64, 256):
        print(f"calibrated fusion, protect {protect}: "
              f"{error(calibrated.calibrated_fusion(mlp, k, cal, act, protect=protect)):.4f}", flush=True)
    for clusters in (32, 128, 384, k):
        print(f"protect {k - clusters}, cluster the rest into {clusters}: "
              f"{error(clustered_rest(mlp, cal, act, k, clusters, score, h, target)):.4f}", flush=True)


if __name__ == "__main__":
    main()
