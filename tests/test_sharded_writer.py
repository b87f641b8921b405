"""ShardedWriter: streams each tensor to its shard (no buffering), valid safetensors in every path."""

import gc
import json
import time
import weakref

import pytest
import torch
from safetensors import safe_open

from mlpfuse.checkpoints import tensors as checkpoint
from mlpfuse.checkpoints.tensors import ShardedWriter


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(11, generator=g),
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5, dtype=torch.float16),
        "f.empty": torch.zeros(0, 4),
        "g.strided": torch.randn(6, 4, generator=g).T,  # not contiguous
        "h.double": torch.randn(3, generator=g, dtype=torch.float64),
    }


def read_back(directory):
    index = directory / checkpoint.SAFE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else [checkpoint.SAFE_SINGLE]
    out = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():
                assert key not in out
                out[key] = f.get_tensor(key)
    return out, files


@pytest.mark.parametrize("compact_below", [64 << 20, 0])  # exact header / reserved padded header
@pytest.mark.parametrize("max_bytes", [10**9, 60])
def test_round_trip_every_dtype_and_shard_layout(tmp_path, monkeypatch, compact_below, max_bytes):
    monkeypatch.setattr(checkpoint, "_COMPACT_BELOW", compact_below)
    writer = ShardedWriter(tmp_path, max_bytes)
    src = tensors()
    for name, t in src.items():
        writer.add(name, t)
    files = writer.close()
    back, shard_files = read_back(tmp_path)
    assert set(back) == set(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert (len(shard_files) > 1) == (max_bytes == 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    if len(shard_files) > 1:
        index = json.loads((tmp_path / checkpoint.SAFE_INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    size = sum((tmp_path / f).stat().st_size for f in shard_files)
    if compact_below:  # small shards carry no reserved header space
        assert size < 4096
    else:
        assert size > checkpoint._HEADER_SPACE


def test_keeps_no_reference_to_written_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, 10**9)
    t = torch.randn(256, 256)
    ref = weakref.ref(t)
    writer.add("w", t)
    del t
    gc.collect()
    assert ref() is None  # written through, not buffered until the shard is full
    writer.close()
    assert read_back(tmp_path)[0]["w"].shape == (256, 256)


def test_header_space_full_starts_a_new_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_HEADER_SPACE", 600)
    monkeypatch.setattr(checkpoint, "_COMPACT_BELOW", 0)
    writer = ShardedWriter(tmp_path, 10**9)
    src = {f"layer.{i}.some.rather.long.tensor.name.weight": torch.full((3,), float(i)) for i in range(20)}
    for name, t in src.items():
        writer.add(name, t)
    writer.close()
    back, files = read_back(tmp_path)
    assert len(files) > 1
    assert all(torch.equal(back[n], t) for n, t in src.items())


def test_no_tensors_gives_one_valid_file(tmp_path):
    assert ShardedWriter(tmp_path, 100).close() == [checkpoint.SAFE_SINGLE]
    assert read_back(tmp_path)[0] == {}


def test_twice_the_same_name_is_a_bug(tmp_path):
    writer = ShardedWriter(tmp_path, 100)
    writer.add("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="twice"):
        writer.add("x", torch.zeros(2))


def test_small_shard_is_byte_identical_to_save_file(tmp_path):
    from safetensors.torch import save_file

    src = {k: v.contiguous() for k, v in tensors().items()}
    writer = ShardedWriter(tmp_path / "w", 10**9)
    (tmp_path / "w").mkdir()
    for name, t in src.items():
        writer.add(name, t)
    writer.close()
    save_file(src, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    # same bytes, so the same alignment of every tensor once memory-mapped by a loader
    assert (tmp_path / "w" / checkpoint.SAFE_SINGLE).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("queue_bytes", [1 << 30, 16])  # all queued / add waits for the thread each time
@pytest.mark.parametrize("compact_below", [64 << 20, 0])
def test_background_writer_writes_the_same_bytes(tmp_path, monkeypatch, queue_bytes, compact_below):
    monkeypatch.setattr(checkpoint, "_COMPACT_BELOW", compact_below)
    monkeypatch.setattr(checkpoint, "_QUEUE_BYTES", queue_bytes)
    outputs = {}
    for background in (False, True):
        directory = tmp_path / str(background)
        directory.mkdir()
        writer = ShardedWriter(directory, 60, background=background)
        for name, t in tensors().items():
            writer.add(name, t)
        files = writer.close()
        outputs[background] = {f: (directory / f).read_bytes() for f in files}
    assert len(outputs[True]) > 2 and outputs[True] == outputs[False]


def test_background_writer_raises_its_thread_error_in_the_caller(tmp_path):
    directory = tmp_path / "gone"
    directory.mkdir()
    writer = ShardedWriter(directory, 60, background=True)
    directory.rmdir()  # the thread cannot open its shard
    with pytest.raises(FileNotFoundError):
        for name, t in tensors().items():
            writer.add(name, t)
        writer.close()
    twice = ShardedWriter(tmp_path, 60, background=True)
    twice.add("a", torch.ones(1))
    with pytest.raises(RuntimeError, match="written twice"):
        twice.add("a", torch.ones(1))
    twice.close()


def test_background_writer_abort_stops_the_thread_before_the_folder_goes(tmp_path):
    """A failed run aborts the writer: its thread ends, so nothing is written into a removed folder."""
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(tmp_path, 1 << 20, background=True) as writer:
            for i in range(20):
                writer.add(f"t{i}", torch.ones(64, 1024))
            raise KeyboardInterrupt
    assert not writer._queue._thread.is_alive()
    files_after_abort = sorted(p.name for p in tmp_path.iterdir())
    time.sleep(0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == files_after_abort


def odd_layouts():
    """Views whose strides no contiguous() call fixes: a width-1 bias cut from a [k, 65] feature matrix, etc."""
    features = torch.arange(3 * 65, dtype=torch.float32).reshape(3, 65)
    return {
        "one.bias": features[:1, 32],  # [1], stride 65 (fuse --dim 1: b_in of the single cluster)
        "one.column": features[:, 32:33],  # [3, 1], strides (65, 1)
        "one.element": torch.as_strided(features, (1, 1), (65, 65)),  # [1, 1], strides (65, 65)
        "every.other": features[:, ::2],  # step slicing
        "broadcast": torch.ones(4, dtype=torch.bfloat16).expand(3, 4),  # stride 0
        "offset": features.flatten()[7:19],  # storage offset
        "bf16.column": features.to(torch.bfloat16)[1:, 64:],  # [2, 1], strides (65, 1)
    }


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("compact_below", [64 << 20, 0])
def test_any_strided_view_is_written_as_its_values(tmp_path, monkeypatch, background, compact_below):
    monkeypatch.setattr(checkpoint, "_COMPACT_BELOW", compact_below)
    writer = ShardedWriter(tmp_path, 10**9, background=background)
    src = odd_layouts()
    for name, t in src.items():
        writer.add(name, t)
    writer.close()
    back, _ = read_back(tmp_path)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
