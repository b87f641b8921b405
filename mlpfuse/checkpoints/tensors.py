"""Reading and writing Hugging Face checkpoints tensor by tensor.

``CheckpointReader`` opens safetensors files memory-mapped (single or sharded with an index) or
legacy ``.bin`` files with ``weights_only``; tensors are read one at a time, never the whole model.
``ShardedWriter`` writes safetensors shards as they fill, then the index. Where and how an output
is written (checks, lock, staging directory, atomic rename) lives in :mod:`mlpfuse.checkpoints.output`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlpfuse.errors import InputError
from mlpfuse.runtime import file_sha256

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def read_config(directory: Path) -> dict:
    """The checkpoint's config.json as a dict; InputError if missing, unreadable or not a JSON object."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise InputError(f"{directory} is not a Hugging Face checkpoint: no config.json in it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} holds a JSON {type(config).__name__}, not an object of field: value; "
                         f"restore the checkpoint's config.json")
    return config


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files of a checkpoint and, when sharded, the name -> file map of its index."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_weight_map(index)
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index} names missing shard(s): {', '.join(missing)}")
            return files, {k: directory / v for k, v in weight_map.items()}
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (directory / single).is_file():
            return [directory / single], None
    raise InputError(f"{directory} holds no model weights (model.safetensors or pytorch_model.bin)")


def _read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index file."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the shard index {index}: {exc}; restore it from the original checkpoint") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise InputError(f"the shard index {index} has no weight_map of tensor name: shard file; "
                         f"restore it from the original checkpoint")
    bad = sorted({v for v in weight_map.values() if Path(v).name != v})
    if bad:
        raise InputError(f"the shard index {index} names shard files outside its directory: {', '.join(bad[:3])}")
    return weight_map


class CheckpointReader:
    """Lazy, memory-mapped access to a checkpoint's tensors by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files, weight_map = _weight_files(self.directory)
        self.is_safetensors = self.files[0].suffix == ".safetensors"
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        for file in self.files:
            names = self._open(file).keys()
            for name in names:
                if weight_map is None or weight_map.get(name) == file:
                    self._file_of[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                if self.is_safetensors:
                    self._handles[file] = safe_open(str(file), framework="pt")
                else:
                    self._handles[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # corrupt or truncated files come in many forms
                raise InputError(f"cannot read weights file {file}: {exc}") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names in a stable (sorted) order."""
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self._file_of[name])
        if self.is_safetensors:
            return handle.get_tensor(name)
        return handle[name].clone()  # .bin files may tie tensors; safetensors refuses shared storage

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._file_of[name])
        if self.is_safetensors:
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def is_floating(self, name: str) -> bool:
        """Whether a tensor holds floating-point values (read from the header, not the data)."""
        handle = self._open(self._file_of[name])
        if self.is_safetensors:
            return handle.get_slice(name).get_dtype().startswith(("F", "BF"))
        return handle[name].is_floating_point()

    def dtype(self, name: str) -> str:
        """The stored dtype of a tensor as the file names it (``F32``, ``BF16``, ``I64``; torch's for .bin)."""
        handle = self._open(self._file_of[name])
        if self.is_safetensors:
            return handle.get_slice(name).get_dtype()
        return str(handle[name].dtype).replace("torch.", "")

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of a tensor as stored, or cast to ``dtype``; read from the header, not the data."""
        numel = 1
        for size in self.shape(name):
            numel *= size
        if dtype is not None:
            return numel * dtype.itemsize
        handle = self._open(self._file_of[name])
        if not self.is_safetensors:
            return numel * handle[name].element_size()
        return numel * _ST_BYTES.get(handle.get_slice(name).get_dtype(), 1)  # float8 and smaller: 1 at most

    def sha256(self) -> str:
        """Hash of the weight files' bytes, in file-name order: identifies the source checkpoint."""
        return file_sha256(*self.files)


def parse_size(text: str | int) -> int:
    """Bytes (> 0) from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a positive int; InputError otherwise."""
    hint = "use a positive number with a unit, e.g. 5GB or 500MB"
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InputError(f"bad size {text!r}: {hint}")
    if isinstance(text, int):
        if text <= 0:
            raise InputError(f"bad size {text!r}: {hint}")
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    clean = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if clean.endswith(unit):
            number = clean[: -len(unit)].strip()
            try:
                size = int(float(number) * units[unit])
            except (ValueError, OverflowError):
                break
            if size <= 0:
                break
            return size
    raise InputError(f"bad size {text!r}: {hint}")


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_BYTES = {**{name: dtype.itemsize for dtype, name in _ST_DTYPES.items()}, "U64": 8, "U32": 4, "U16": 2}
_HEADER_SPACE = 1 << 20  # bytes reserved for each shard's JSON header while its data is written
_COMPACT_BELOW = 64 << 20  # shards with less data than this are rewritten with an exact header on close


class ShardedWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes``, one tensor at a time.

    Each tensor's bytes go to the open shard file as soon as it is added and the writer keeps no
    reference to it, so memory stays flat whatever the model size (nothing is buffered; the OS page
    cache holds what was written, as file-backed memory). The header goes in a space reserved at
    the start of the shard (``_HEADER_SPACE``, padded with spaces as the safetensors format allows)
    and is written when the shard is finished; a shard whose header would overflow that space is
    finished early. Shards with less than ``_COMPACT_BELOW`` bytes of data are rewritten by
    safetensors' ``save_file`` (no padding, the same bytes as writing them in one go). Raises InputError for a tensor dtype safetensors cannot store.

    ``background=True`` writes in a thread, overlapping the caller's compute: ``add`` queues the
    tensor (the caller must not modify it afterwards) and returns; at most ``_QUEUE_BYTES`` of
    tensors (or one tensor, if larger) wait in the queue, more blocks ``add``. The bytes written are
    the same, in the same order. An error in the thread is raised by the next ``add`` or ``close``.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, background: bool = False):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._file = None  # the open shard
        self._entries: dict[str, dict] = {}
        self._offset = 0  # data bytes written to the open shard
        self._header_bytes = 0  # estimate of the open shard's header size
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self._queue = _WriteQueue(self._write) if background else None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any device, any layout) under ``name`` to the current shard."""
        if tensor.dtype not in _ST_DTYPES:
            raise InputError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        if name in self._names:
            raise RuntimeError(f"tensor {name} written twice")
        self._names.add(name)
        if self._queue is not None:
            self._queue.put(name, tensor)
        else:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        entry_bytes = len(json.dumps(name)) + 96 + 21 * tensor.dim()  # upper bound of its header entry
        if self._file is not None and self._entries and (
                self._offset + size > self.max_shard_bytes
                or self._header_bytes + entry_bytes > _HEADER_SPACE - 256):
            self._finish_shard()
        if self._file is None:
            self._open_shard()
        self._file.write(memoryview(flat_bytes(tensor).numpy()))
        self._entries[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self._header_bytes += entry_bytes
        self.total_bytes += size

    def _open_shard(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        self._file = open(path, "wb")
        self._file.seek(8 + _HEADER_SPACE)
        self._shards.append((path, []))
        self._entries, self._offset, self._header_bytes = {}, 0, 64

    def _header(self) -> bytes:
        return json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()

    def _finish_shard(self) -> None:
        header = self._header()
        path = self._shards[-1][0]
        self._shards[-1][1].extend(self._entries)
        if len(header) > _HEADER_SPACE:
            raise RuntimeError(f"safetensors header of {path} outgrew its reserved space")
        self._file.seek(0)
        self._file.write(_HEADER_SPACE.to_bytes(8, "little") + header.ljust(_HEADER_SPACE, b" "))
        self._file.close()
        self._file = None
        if self._offset < _COMPACT_BELOW:
            # Small shard: rewrite it as safetensors' own save_file would (exact header, its tensor
            # order and alignment), holding at most _COMPACT_BELOW bytes for a moment.
            with safe_open(str(path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            compact = path.with_suffix(".compact")
            save_file(tensors, str(compact), metadata={"format": "pt"})
            del tensors
            compact.replace(path)
        path.chmod(0o644)  # safetensors may create the file private

    def abort(self) -> None:
        """Stop a background writer's thread (queued tensors dropped) before the caller removes the folder."""
        if self._queue is not None:
            self._queue.abort()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:  # a failed or interrupted run: no thread may write on into a removed folder
            self.abort()

    def close(self) -> list[str]:
        """Finish the last shard, name the shards ``model-0000i-of-0000n.safetensors``, write the index."""
        if self._queue is not None:
            self._queue.join()  # every queued tensor written (or the thread's error raised)
        if self._file is None and not self._shards:
            self._open_shard()  # no tensors at all: one empty, valid file
        if self._file is not None:
            self._finish_shard()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.directory / SAFE_SINGLE)
            return [SAFE_SINGLE]
        count = len(self._shards)
        weight_map, names = {}, []
        for number, (path, keys) in enumerate(self._shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names + [SAFE_INDEX]


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The elements of ``tensor`` in row-major order as a flat uint8 tensor on the CPU, whatever its strides.

    ``contiguous()`` alone is not enough: a view whose only non-unit dimension is 1 long (a width-1
    bias cut from a wider matrix, stride 65) counts as contiguous yet keeps its stride, and bytes
    can be read only from a stride-1 buffer. Such a tensor (and any strided view) is copied once.
    """
    flat = tensor.detach().to("cpu").reshape(-1)
    if flat.numel() > 0 and flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


_QUEUE_BYTES = 256 << 20  # tensors waiting for a background ShardedWriter's thread


class _WriteQueue:
    """One daemon thread calling ``write(name, tensor)`` in order, at most ``_QUEUE_BYTES`` queued."""

    def __init__(self, write):
        import collections
        import threading

        self._write, self._items, self._bytes, self._error = write, collections.deque(), 0, None
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlpfuse-writer")
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self._condition:
            while self._items and self._bytes + size > _QUEUE_BYTES and self._error is None:
                self._condition.wait()
            self._raise()
            self._items.append((name, tensor, size))
            self._bytes += size
            self._condition.notify_all()

    def join(self) -> None:
        with self._condition:
            self._items.append(None)  # the end
            self._condition.notify_all()
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        with self._condition:
            self._items.clear()
            self._items.append(None)
            self._bytes = 0
            self._condition.notify_all()
        self._thread.join()  # a tensor being written is finished; nothing after it

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._items:
                    self._condition.wait()
                item = self._items[0]
            if item is None:
                return
            name, tensor, size = item
            try:
                self._write(name, tensor)
            except BaseException as exc:  # handed to the caller's next put or join
                with self._condition:
                    self._error = exc
                    self._items.clear()
                    self._condition.notify_all()
                return
            with self._condition:
                if self._items and self._items[0] is item:  # not when abort() emptied the queue meanwhile
                    self._items.popleft()
                    self._bytes -= size
                self._condition.notify_all()


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
