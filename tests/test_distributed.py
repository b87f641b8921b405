"""torchrun: ``fuse`` split over 2 CPU ranks writes the same weights as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlpfuse import distributed
from mlpfuse.fuse import FuseSettings, fuse_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_plain_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world()[1] == 1 and not distributed.is_worker()
    assert list(distributed.gather_in_order([1, 2, 3], lambda i: i * 10)) == [10, 20, 30]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.is_worker()


def test_two_ranks_byte_identical_to_one_process(tiny_checkpoint, tmp_path):
    pytest.importorskip("torch.distributed.run")
    source, _, _ = tiny_checkpoint("llama")  # 2 layers: layer 0 on rank 0, layer 1 on rank 1
    single = tmp_path / "single"
    fuse_checkpoint(str(source), single, FuseSettings(layers="all", ratio=0.5, seed=3, backend="torch"))
    multi = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mlpfuse", "fuse", str(source), "-o", str(multi), "--layers", "all", "--ratio", "0.5",
           "--seed", "3", "--backend", "torch"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in multi.iterdir())
    for name in names:
        if name == "README.md":  # the model card records wall times
            continue
        assert (single / name).read_bytes() == (multi / name).read_bytes(), name
    assert done.stdout.count("parameters:") == 1  # only rank 0 reports
