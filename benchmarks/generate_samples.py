"""Greedy generations from causal-LM checkpoints (original, fused, tuned), side by side, for docs/llm.md.

    python benchmarks/generate_samples.py /tmp/smol/smollm2-135m out/fused out/tuned --max-new-tokens 24
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = ("The capital of France is", "The movie was so boring that", "To make a cup of tea, first")


def main() -> None:
    import mlpfuse
    from mlpfuse.runtime import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    for model_dir in args.models:
        model = mlpfuse.load(model_dir, task="causal-lm", dtype=torch.float32).eval()
        tokenizer = load_tokenizer(model_dir)
        print(f"## {model_dir}")
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"- {prompt!r} -> {text!r}", flush=True)


if __name__ == "__main__":
    main()
