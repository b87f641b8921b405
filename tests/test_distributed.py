"""torchrun: ``fuse`` split over 2 CPU ranks writes the same weights as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
from mlpfuse.train import distributed

ROOT = Path(__file__).resolve().parent.parent


def test_plain_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world()[1] == 1 and not distributed.is_worker()
    assert list(distributed.gather_in_order([1, 2, 3], lambda i: i * 10)) == [10, 20, 30]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.is_worker()


@pytest.mark.slow
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


@pytest.mark.slow
def test_tune_on_two_ranks_matches_one_process(tmp_path):
    """Data parallel tune: each rank takes half of every batch of 8; the step is the one-process step."""
    pytest.importorskip("torch.distributed.run")
    import torch
    from safetensors.torch import load_file

    from mlpfuse.train.tune import TuneSettings, tune_checkpoint

    from .conftest import make_checkpoints, write_texts

    original, fused = make_checkpoints(tmp_path)
    data = write_texts(tmp_path / "text.tsv", rows=30)  # 4 batches of 8, the last of 6 (3 per rank)
    single, multi = tmp_path / "single", tmp_path / "multi"
    settings = TuneSettings(lr=3e-3, batch_size=8, max_steps=4, save_every=0)
    report = tune_checkpoint(str(fused), str(original), str(data), single, settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mlpfuse", "tune", str(fused), "--teacher", str(original), "--data", str(data), "-o", str(multi),
           "--lr", "3e-3", "--batch-size", "8", "--max-steps", "4", "--save-every", "0", "--json", str(tmp_path / "r.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = load_file(str(single / "model.safetensors")), load_file(str(multi / "model.safetensors"))
    assert first.keys() == second.keys()
    moved = 0
    for name in first:
        # float32 sums in another order (half batches, padded to their own length), then 4 Adam steps
        # of size <= lr = 3e-3: measured <= 1e-7, far below one step, while a wrong gradient scale (a rank's mean
        # instead of the batch's) or a missing all-reduce changes the weights by about a step
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(first[name], load_file(str(fused / "model.safetensors"))[name]))
    assert moved > 0
    import json

    multi_report = json.loads((tmp_path / "r.json").read_text())
    assert multi_report["steps"] == report.steps == 4
    assert multi_report["final_loss"] == pytest.approx(report.final_loss, rel=1e-4)


@pytest.mark.slow
def test_finetune_on_two_cpu_ranks_matches_one_process(tmp_path):
    """Trainer under torchrun without GPUs: the ranks join (gloo), so 32 rows at --batch-size 4 per
    rank take 4 steps of global batch 8 and end where one process with --batch-size 8 ends."""
    pytest.importorskip("torch.distributed.run")
    import json

    import torch
    from safetensors.torch import load_file

    from mlpfuse.train.finetune import FinetuneSettings, finetune

    from .test_finetune import write_keyword_texts
    from .conftest import make_checkpoints

    _, fused = make_checkpoints(tmp_path)
    config = json.loads((fused / "config.json").read_text())  # dropout off: the ranks' RNG streams differ
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (fused / "config.json").write_text(json.dumps(config))
    train = write_keyword_texts(tmp_path / "train.tsv", rows=32, seed=1, targets={"excellent": "pos", "terrible": "neg"})
    single, multi = tmp_path / "single", tmp_path / "multi"
    finetune(str(fused), str(train), None, single, FinetuneSettings(epochs=1, batch_size=8, max_length=16, lr=1e-3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mlpfuse", "finetune", str(fused), "--train", str(train), "-o", str(multi), "--epochs", "1",
           "--batch-size", "4", "--max-length", "16", "--lr", "1e-3", "--json", str(tmp_path / "r.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["train_steps"] == 4  # not 8 per rank
    assert json.loads((multi / "mlpfuse_finetune.json").read_text())["metrics"]["train_steps"] == 4
    first, second = load_file(str(single / "model.safetensors")), load_file(str(multi / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        # measured <= 1.2e-7 (float32 gradient averaging order); the loss scaled by the rank count
        # (transformers' average_tokens_across_devices on a mean loss) gave 3e-4 through the clipping
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-6, msg=name)
