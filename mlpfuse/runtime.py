"""Runtime helpers every command shares, each in one place: devices, dtype names, tokenizers,
file hashes and the encoder-decoder forward inputs.

torch and transformers are imported inside the functions that need them, so importing this module
stays cheap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlpfuse.errors import EnvironmentProblem, InputError

# One dtype vocabulary for every command: each spelling -> its canonical name.
DTYPE_SPELLINGS = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
DTYPE_CHOICES = "float32 (fp32), bfloat16 (bf16), float16 (fp16)"


def dtype_name(text: str | None, allow_auto: bool = False, flag: str = "--dtype") -> str:
    """The canonical dtype name (``float32``, ``bfloat16``, ``float16``, or ``auto``) for any spelling.

    Accepts ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16`` in any case, plus
    ``auto`` when ``allow_auto`` (None then means ``auto``). Raises InputError otherwise.
    """
    clean = str(text).strip().lower() if text is not None else ("auto" if allow_auto else "")
    if allow_auto and clean == "auto":
        return "auto"
    if clean in DTYPE_SPELLINGS:
        return DTYPE_SPELLINGS[clean]
    choices = ("auto, " if allow_auto else "") + DTYPE_CHOICES
    raise InputError(f"unknown {flag} {text!r}; choose {choices}")


def torch_dtype(text: str | None, allow_auto: bool = False, flag: str = "--dtype"):
    """The ``torch.dtype`` for a dtype name of :func:`dtype_name` (None for ``auto``)."""
    import torch

    name = dtype_name(text, allow_auto, flag)
    return None if name == "auto" else getattr(torch, name)


def resolve_device(name: str | None, flag: str = "--device"):
    """The ``torch.device`` to run on: the one resolution every command uses.

    ``None``/``auto``: CUDA when a GPU is present, else CPU. ``cpu``, ``cuda``, ``cuda:N`` as given.
    Raises InputError for anything else (a typo, ``mps``), EnvironmentProblem (exit 3) when CUDA is
    asked for and there is no GPU, or fewer GPUs than ``N + 1``.
    """
    import torch

    if name is None or str(name).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name).strip())
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown {flag} {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"unsupported {flag} {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise EnvironmentProblem(f"{flag} {name} asked for, but no CUDA GPU is available here; use {flag} cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"{flag} {name} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) "
                                 f"exist here; use cuda:0")
    return device


def check_window(max_length: int, config, flag: str = "--max-length", default: int | None = None) -> int:
    """The window length to use: ``max_length``, or the model's positions when ``max_length`` is the
    command's ``default`` and the model has fewer (a default adapts to the model; a value given
    on purpose does not). Raises InputError when windows of ``max_length`` tokens are longer than
    the model's positions otherwise."""
    from mlpfuse.arch import max_positions  # the family's position table (arch/registry.py)

    limit = max_positions(config)
    if limit is not None and max_length > limit:
        if max_length == default:
            return limit
        raise InputError(f"{flag} {max_length} is longer than the model's {limit} positions; "
                         f"use {flag} {limit} or less")
    return max_length


def file_sha256(*paths: str | Path) -> str:
    """Hex sha256 of the bytes of ``paths``, concatenated in the order given (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


class InBackground:
    """``function()`` run in a daemon thread from construction on; :meth:`result` waits for it.

    For work that releases the GIL (hashing large blocks, file reads) and overlaps the caller's
    compute. A daemon thread: an interrupted run does not wait for it at exit. ``result`` returns
    the value or re-raises the exception the function raised.
    """

    def __init__(self, function):
        import threading

        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self._value = function()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds any file a tokenizer is built from."""
    directory = Path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES) or \
        any(path.is_file() for pattern in ("*.model", "*.tiktoken") for path in directory.glob(pattern))


def load_tokenizer(directory: str | Path, fallback: str | Path | None = None):
    """The checkpoint's tokenizer (from ``directory``, else ``fallback``), with a padding token.

    A tokenizer without a pad token (GPT-2, LLaMA) gets its EOS token (else UNK) as pad token.
    Raises InputError naming the files looked for when neither directory has tokenizer files, or
    when the files there cannot be read.
    """
    from transformers import AutoTokenizer

    from mlpfuse.checkpoints.modeling import register_with_transformers

    register_with_transformers()  # a fused config.json then opens without a remote-code prompt
    candidates = [Path(d) for d in (directory, fallback) if d is not None]
    source = next((d for d in candidates if has_tokenizer_files(d)), None)
    if source is None:
        where = " or ".join(str(d) for d in candidates)
        raise InputError(f"no tokenizer files in {where}: it needs tokenizer.json, or tokenizer_config.json with "
                         f"vocab.txt / vocab.json+merges.txt / a sentencepiece .model; copy them from the original "
                         f"model's directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # unreadable tokenizer files fail in many ways (OSError, ValueError, ...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the tokenizer in {source}: {message}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def encoder_decoder_inputs(model, batch: dict) -> dict:
    """Extra forward arguments for an encoder-decoder model: the text itself as decoder input.

    Empty for other models. ``batch`` holds ``input_ids`` and ``attention_mask``.
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        return {}
    return {"decoder_input_ids": batch["input_ids"], "decoder_attention_mask": batch["attention_mask"]}
