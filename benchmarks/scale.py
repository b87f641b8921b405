"""fuse at scale on synthetic LLaMA checkpoints: time against plain I/O, peak anonymous memory.

    PYTHONPATH=. python benchmarks/scale.py --layers 8 16 24 --json benchmarks/results/scale_cpu.json

Builds LLaMA-architecture checkpoints with random bf16 weights (``--hidden``, ``--intermediate``,
one per ``--layers`` count, sharded), then, interleaved per size and repeat, in fresh subprocesses:
- ``io``: read every tensor (CheckpointReader) and write it back as sharded safetensors (ShardedWriter);
- ``fuse``: ``fuse_checkpoint(--layers all --ratio 0.5)`` with k-means replaced by a trivial
  assignment (neuron i -> cluster i mod k) followed by k-means' own finish (exact member means,
  which the fused weights are read from), timed as k-means; ``--kmeans real`` runs the real
  k-means instead. Reported: fuse/io and (fuse - k-means)/io.
Each child samples its own /proc/self/status RssAnon (anonymous, non-file-backed resident memory;
memory-mapped checkpoint pages are file-backed and not counted) every 10 ms and reports the peak;
the end-of-fuse load check (verify_checkpoint) is timed on its own and the peak before it is kept.
``--threads N`` sets torch's thread count in the children (on a shared, loaded machine torch's
OpenMP threads wait for each other: small kernels run many times slower with 2 threads than 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Peak RssAnon of this process, sampled every ``period`` seconds in a thread."""

    def __init__(self, period=0.01):
        self.period, self.peak, self._stop = period, rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.period)

    def __enter__(self):
        self.base = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def build(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int, shard: str) -> None:
    """A LLaMA checkpoint with random bf16 weights, written tensor by tensor."""
    import torch
    import transformers

    from mlpfuse.checkpoints.tensors import ShardedWriter, parse_size

    if (directory / "config.json").exists():
        return
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                                      vocab_size=vocab, tie_word_embeddings=False, torch_dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])  # it has lm_head: load it as a causal LM
    config.save_pretrained(tmp)
    g = torch.Generator().manual_seed(layers)
    writer = ShardedWriter(tmp, parse_size(shard))

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", rnd(vocab, hidden))
    for i in range(layers):
        pre = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(pre + f"self_attn.{name}.weight", rnd(hidden, hidden))
        writer.add(pre + "mlp.gate_proj.weight", rnd(intermediate, hidden))
        writer.add(pre + "mlp.up_proj.weight", rnd(intermediate, hidden))
        writer.add(pre + "mlp.down_proj.weight", rnd(hidden, intermediate))
        writer.add(pre + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(pre + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rnd(vocab, hidden))
    writer.close()
    tmp.rename(directory)


def child(mode: str, src: str, dst: str, shard: str, kmeans: str, threads: str = "0") -> dict:
    """One measured run in this (fresh) process; returns seconds, peak RssAnon and k-means seconds."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the mlpfuse command line sets it (cli.main)
    import torch

    if int(threads):
        torch.set_num_threads(int(threads))

    from mlpfuse.checkpoints.tensors import CheckpointReader, ShardedWriter, parse_size

    from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint  # imports are outside the timed part
    from mlpfuse.compress.kmeans import KMeansResult, _finish
    from mlpfuse.methods import fusion
    from mlpfuse.checkpoints.modeling import verify_checkpoint  # imports transformers' modelling code outside the timing

    shutil.rmtree(dst, ignore_errors=True)
    out = {"mode": mode, "torch_threads": torch.get_num_threads(), "thp": os.environ["THP_MEM_ALLOC_ENABLE"]}
    with PeakSampler() as mem:
        start = time.perf_counter()
        if mode == "io":
            Path(dst).mkdir(parents=True)
            reader = CheckpointReader(src)
            writer = ShardedWriter(Path(dst), parse_size(shard))
            for key in reader.keys():
                writer.add(key, reader.get(key))
            writer.close()
        else:
            if kmeans == "trivial":
                def trivial(x, k, **_):  # neuron i -> cluster i mod k, then k-means' own finish (member means)
                    t = time.perf_counter()
                    labels, centroids, inertia = _finish(x.float().contiguous(), torch.arange(x.shape[0]) % k, k)
                    return KMeansResult(labels, centroids, inertia, time.perf_counter() - t, "trivial", 0)

                fusion.kmeans = trivial
            import mlpfuse.compress.fuse

            def timed_check(directory, *rest, **kw):  # the end-of-fuse load check, timed on its own
                out["peak_anon_bytes_before_check"] = max(mem.peak, rss_anon())
                t = time.perf_counter()
                try:
                    return verify_checkpoint(directory, *rest, **kw)
                finally:
                    out["check_seconds"] = time.perf_counter() - t

            mlpfuse.compress.fuse.verify_checkpoint = timed_check
            report = fuse_checkpoint(src, dst, FuseSettings(layers="all", ratio=0.5, max_shard_size=shard),
                                     overwrite=True)
            out["kmeans_seconds"] = sum(layer.kmeans_seconds or 0.0 for layer in report.layers)
        out["seconds"] = time.perf_counter() - start
    out["peak_anon_bytes"], out["base_anon_bytes"] = mem.peak, mem.base
    out["output_bytes"] = sum(p.stat().st_size for p in Path(dst).iterdir())
    shutil.rmtree(dst, ignore_errors=True)
    return out


def run_child(mode, src, dst, shard, kmeans, threads=0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(src), str(dst), shard, kmeans, str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--shard", default="200MB", help="max shard size of the inputs and outputs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kmeans", choices=["trivial", "real"], default="trivial")
    p.add_argument("--work", default="/tmp/mlpfuse-scale", help="where the synthetic checkpoints go")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    work = Path(args.work)
    sizes = {n: work / f"llama-h{args.hidden}-i{args.intermediate}-l{n}" for n in args.layers}
    for n, path in sizes.items():
        build(path, n, args.hidden, args.intermediate, args.vocab, args.shard)
    runs = {n: {"io": [], "fuse": []} for n in args.layers}
    for _ in range(args.repeats):
        for n, path in sizes.items():
            for mode in ("io", "fuse"):
                r = run_child(mode, path, work / "out", args.shard, args.kmeans, args.threads)
                runs[n][mode].append(r)
                print(f"layers {n:>3} {mode:<5} {r['seconds']:7.2f} s  peak RssAnon {r['peak_anon_bytes'] / 2**20:7.1f} MiB",
                      flush=True)
    rows = []
    for n in args.layers:
        io_s = statistics.median(r["seconds"] for r in runs[n]["io"])
        fu_s = statistics.median(r["seconds"] for r in runs[n]["fuse"])
        km_s = statistics.median(r["kmeans_seconds"] for r in runs[n]["fuse"])
        ck_s = statistics.median(r["check_seconds"] for r in runs[n]["fuse"])
        rows.append({"layers": n, "checkpoint_bytes": sum(f.stat().st_size for f in sizes[n].iterdir()),
                     "io_seconds": io_s, "fuse_seconds": fu_s, "kmeans_seconds": km_s,
                     "ratio": fu_s / io_s, "ratio_outside_kmeans": (fu_s - km_s) / io_s, "kmeans_share": km_s / fu_s,
                     "check_seconds": ck_s, "ratio_outside_kmeans_and_check": (fu_s - km_s - ck_s) / io_s,
                     "fuse_peak_anon_mib_before_check": max(r["peak_anon_bytes_before_check"]
                                                            for r in runs[n]["fuse"]) / 2**20,
                     "io_peak_anon_mib": max(r["peak_anon_bytes"] for r in runs[n]["io"]) / 2**20,
                     "fuse_peak_anon_mib": max(r["peak_anon_bytes"] for r in runs[n]["fuse"]) / 2**20,
                     "runs": runs[n]})
    print(f"{'layers':>6} {'GB':>6} {'io s':>7} {'fuse s':>7} {'check s':>7} {'ratio':>6} {'outside':>7} {'w/o chk':>7} "
          f"{'kmeans %':>8} {'io MiB':>8} {'fuse MiB':>9} {'pre-chk':>8}")
    for r in rows:
        print(f"{r['layers']:>6} {r['checkpoint_bytes'] / 1e9:>6.2f} {r['io_seconds']:>7.2f} {r['fuse_seconds']:>7.2f} "
              f"{r['check_seconds']:>7.2f} {r['ratio']:>6.2f} {r['ratio_outside_kmeans']:>7.2f} "
              f"{r['ratio_outside_kmeans_and_check']:>7.2f} {100 * r['kmeans_share']:>8.1f} {r['io_peak_anon_mib']:>8.0f} "
              f"{r['fuse_peak_anon_mib']:>9.0f} {r['fuse_peak_anon_mib_before_check']:>8.0f}")
    if args.json:
        import torch

        info = {"date": datetime.datetime.utcnow().isoformat(timespec="minutes") + "Z", "machine": platform.platform(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "hidden": args.hidden,
                "intermediate": args.intermediate, "vocab": args.vocab, "shard": args.shard, "kmeans": args.kmeans,
                "repeats": args.repeats, "threads": args.threads, "load_average_before": load_before,
                "load_average_after": os.getloadavg(), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:8])))
    else:
        main()
