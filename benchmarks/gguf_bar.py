"""GGUF bar: a fused model's GGUF files in llama.cpp vs its plain transformers export (docs/deploy.md).

    python benchmarks/gguf_bar.py PLAIN_DIR A.gguf [B.gguf ...]

PLAIN_DIR is ``mlpfuse export FUSED -o PLAIN_DIR`` (the plain transformers checkpoint); each GGUF is
``mlpfuse export FUSED --format gguf --outtype T -o A.gguf``. For the four prompts of
``mlpfuse.deploy.gguf_export.PROMPTS`` (tokenised by the checkpoint's tokenizer) it prints, per GGUF, whether
llama.cpp's top-1 next token equals transformers', and max |llama.cpp - transformers| / max |transformers|
over the next-token logits (the relative difference the bar holds below 0.05).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import transformers

from mlpfuse.deploy.gguf_export import PROMPTS, plain_cpu_buffers
from mlpfuse.runtime import load_tokenizer


def main(plain: str, files: list[str]) -> None:
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(plain)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    model = transformers.AutoModelForCausalLM.from_pretrained(plain).eval()
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy() for ids in prompts]
    import llama_cpp

    for path in files:
        start = time.perf_counter()
        with plain_cpu_buffers(llama_cpp):  # see its docstring: Q8_0 with CPU repacking crashes here
            llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=2)
        top1, relative = [], 0.0
        for ids, ref in zip(prompts, reference):
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
            top1.append(int(got.argmax()) == int(ref.argmax()))
            relative = max(relative, float(np.abs(got - ref).max() / np.abs(ref).max()))
        llm.close()
        print(f"{path}: top-1 equal {sum(top1)}/{len(top1)} {top1}, max relative logit difference {relative:.2e} "
              f"({time.perf_counter() - start:.1f}s, llama-cpp-python {llama_cpp.__version__})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
