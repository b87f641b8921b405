"""Peak anonymous memory and time of the end-of-command load check, whole-model load vs streaming.

    PYTHONPATH=. python benchmarks/check_memory.py FUSED_CHECKPOINT [--json out.json]

For a fused checkpoint (e.g. one ``benchmarks/scale.py`` or ``mlpfuse fuse`` wrote), each in a
fresh process: ``verify_checkpoint(dir)`` as fuse and merge-layers call it, and
``verify_checkpoint(saved, reference=model)`` as tune and finetune call it (the model loaded and
saved with ``save_pretrained`` first, outside the measurement), once with the whole-model load
(``verify.FULL_LOAD_BELOW`` above the size) and once streaming (``FULL_LOAD_BELOW = 0``).
Reported: seconds and the peak RssAnon reached during the check above the RssAnon before it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import PeakSampler, rss_anon  # noqa: E402


def child(directory: str, mode: str, path: str) -> dict:
    import torch

    import mlpfuse
    from mlpfuse.checkpoints import verify
    from mlpfuse.checkpoints.tensors import read_config
    from mlpfuse.checkpoints.format import checkpoint_task
    from mlpfuse.checkpoints.modeling import verify_checkpoint

    verify.FULL_LOAD_BELOW = 0 if path == "streaming" else 1 << 62
    reference = None
    if mode == "reference":  # as tune/finetune: the model is in memory and was just saved
        reference = mlpfuse.load(directory, task=checkpoint_task(read_config(Path(directory))) or "base")
        saved = Path(directory).with_name(Path(directory).name + ".saved")
        shutil.rmtree(saved, ignore_errors=True)
        reference.save_pretrained(saved)
        directory = str(saved)
    torch.manual_seed(0)
    before = rss_anon()
    with PeakSampler() as mem:
        start = time.perf_counter()
        compared = verify_checkpoint(directory, reference=reference)
        seconds = time.perf_counter() - start
    if mode == "reference":
        shutil.rmtree(directory, ignore_errors=True)
    return {"mode": mode, "path": path, "seconds": seconds, "compared": compared,
            "peak_above_before_mib": (mem.peak - before) / 2**20, "before_mib": before / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for mode in ("files", "reference"):
        for path in ("whole", "streaming"):
            done = subprocess.run([sys.executable, __file__, "--child", args.checkpoint, mode, path],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:<9} {path:<9} {row['seconds']:6.2f} s  +{row['peak_above_before_mib']:7.1f} MiB "
                  f"(RssAnon before {row['before_mib']:.0f} MiB)", flush=True)
    size = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:5])))
    else:
        main()
