"""``export --format gguf``: a fused checkpoint in, one GGUF file for llama.cpp out.

Builds on :mod:`mlpfuse.deploy.export`: the fused model's state as plain base-architecture tensors
(``plain_state_dict``: P folded into the down projections, low-rank factors multiplied out, tied
modules copied), widths resolved per config field (``resolve_widths``, ``--pad``). Then, with the
maintained ``gguf`` package: tensor names from its own map (``gguf.get_tensor_name_map``), metadata
keys from its constants (``gguf.Keys``), tokenizer from its vocab helpers (:mod:`mlpfuse.deploy.gguf_vocab`),
the file from its ``GGUFWriter``. What differs between a family's transformers checkpoint and llama.cpp's
reading of it (rotary layout, Gemma's ``1 + w`` norms, packed q/k/v order, the architecture name) is one
table: :mod:`mlpfuse.arch.gguf_table`.

Per-layer MLP widths are written as an array ``{arch}.feed_forward_length`` for architectures whose
llama.cpp loader sizes each layer from it (LLaMA-shaped families are written as llama.cpp's ``deci``);
elsewhere differing widths need ``--pad`` (zero neurons, exact).

Checked before success: the file is written under a temporary name beside the target, read back with
``gguf.GGUFReader`` (every tensor's name, shape and type, and the metadata written), and, when
``llama_cpp`` (llama-cpp-python) is importable, run: its next-token logits on a few prompts must agree
with the fused model's (which ``export`` proves equal to the plain transformers export): the same top-1
token, and max |llama.cpp - transformers| / max |transformers| below :data:`TOLERANCE` for the outtype.
Only then is it renamed to the target.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from mlpfuse.arch.gguf_table import GgufFamily, gguf_family, supported_text
from mlpfuse.checkpoints.output import check_target, environment_problem, rename_no_replace, resolve_target
from mlpfuse.checkpoints.source import resolve_model
from mlpfuse.deploy.export import _meta_model, _width_fields, load_fused_for_export, plain_state_dict, resolve_widths
from mlpfuse.errors import EnvironmentProblem, InputError, MlpfuseError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# max |llama.cpp - transformers| / max |transformers| over the next-token logits, per outtype
TOLERANCE = {"f32": 1e-2, "f16": 1e-2, "bf16": 5e-2, "q8_0": 2e-1}
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "Water boils at a temperature of 100 degrees")
GGUF_MARK = "mlpfuse.export.source"  # metadata key: this GGUF was written by mlpfuse (what --overwrite may replace)


@dataclass
class GgufReport:
    """What ``export --format gguf`` wrote and measured.

    ``widths``: the per-layer MLP widths written (one value when uniform); ``per_layer``: written as an
    array; ``check``: llama.cpp's run (``runtime`` version, ``prompts``, ``top1_equal``,
    ``max_relative_diff``, ``tokens_agree``) or None when llama_cpp is not installed.
    """

    source: str
    output: str
    model_type: str
    arch: str
    outtype: str
    widths: list = field(default_factory=list)
    per_layer: bool = False
    padded: bool = False
    padding: dict = field(default_factory=dict)
    tensors: int = 0
    bytes: int = 0
    tokenizer: dict = field(default_factory=dict)
    check: dict | None = None
    adapter: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the output file ----------------------------------------------------------------------------

def _is_mlpfuse_gguf(path: Path) -> bool:
    try:
        import gguf

        return GGUF_MARK in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - not a readable GGUF: not ours
        return False


def _claim_file(output, inputs, overwrite: bool) -> Path:
    """Check the target file of ``-o`` before any work; returns its resolved path.

    Refused (InputError): an input, inside or around one, a directory, an existing file unless
    ``overwrite`` and it is a GGUF that mlpfuse wrote. The file is written later under a temporary name
    beside it (:func:`_write_atomically`), so its parent must be writable (checked now).
    """
    target = resolve_target(output)
    check_target(target, inputs)
    if target.is_dir():
        raise InputError(f"output {target} is a directory; --format gguf writes one file: pass -o NAME.gguf")
    if os.path.lexists(target):
        if not overwrite:
            raise InputError(f"output {target} already exists; pass --overwrite to replace it or choose another -o")
        if not _is_mlpfuse_gguf(target):
            raise InputError(f"output {target} exists and is not a GGUF written by mlpfuse; --overwrite only replaces "
                             "those: remove it yourself or choose another -o")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-", delete=True)
        probe.close()
        _remove_stale(target)
    except OSError as exc:
        problem = environment_problem(exc, target)
        raise (problem or EnvironmentProblem(f"cannot write {target}: {exc}")) from None
    return target


def _remove_stale(target: Path) -> None:
    """Remove temporary files of earlier runs to ``target`` whose process is gone (killed mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.mlpfuse-incomplete-(\d+)-\d+$")
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if not match or not path.is_file() or path.is_symlink():
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            path.unlink(missing_ok=True)


def _temporary_name(target: Path) -> Path:
    """A hidden name beside ``target`` that no reader takes for the output (``.NAME.mlpfuse-incomplete-PID-N``)."""
    for number in range(1000):
        path = target.parent / f".{target.name}.mlpfuse-incomplete-{os.getpid()}-{number}"
        if not os.path.lexists(path):
            return path
    raise EnvironmentProblem(f"cannot find a temporary name beside {target}")  # pragma: no cover


def _commit(temporary: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished file onto ``target`` (replacing only an earlier mlpfuse GGUF with ``overwrite``)."""
    if os.path.lexists(target):
        if not (overwrite and _is_mlpfuse_gguf(target)):
            raise InputError(f"output {target} appeared while this run worked and was left as it is; nothing was "
                             "written: choose another -o")
        os.replace(temporary, target)
    else:
        try:
            rename_no_replace(temporary, target)
        except FileExistsError:
            raise InputError(f"output {target} appeared while this run worked and was left as it is; nothing "
                             "was written: choose another -o") from None


# ---- widths ------------------------------------------------------------------------------------

_LAYER = re.compile(r"\.(\d+)\.")


def layer_widths(state: dict, fields: dict) -> dict[int, int]:
    """Layer index -> MLP width, read from the tensors each width field sizes (``_width_fields``)."""
    widths: dict[int, int] = {}
    for controlled in fields.values():
        for key, (dim, multiple) in controlled.items():
            match = _LAYER.search(key)
            if key in state and match and state[key].dim() >= 2:
                widths[int(match.group(1))] = max(widths.get(int(match.group(1)), 0), state[key].shape[dim] // multiple)
    return widths


# ---- metadata ----------------------------------------------------------------------------------

def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope(config) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-window ones or None) from a transformers config."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params["full_attention"] or {}, params.get("sliding_attention")
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_theta": config.rope_theta, "rope_type": "default"}
    return params, None


def _key(path: str) -> str:
    import gguf

    value = gguf.Keys
    for part in path.split("."):
        value = getattr(value, part)
    return value


def write_metadata(writer, config, family: GgufFamily, arch: str, widths: list[int], n_vocab: int) -> dict:
    """The ``{arch}.*`` hyperparameters llama.cpp reads, from the plain transformers ``config``.

    ``widths``: one MLP width per layer (written as one value when all are equal). Returns extra
    tensors the family needs (``rope_freqs.weight`` for Llama 3 rotary scaling). Raises InputError for
    a rotary scaling llama.cpp cannot be told about here.
    """
    import gguf

    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(config, "num_hidden_layers", "n_layer"))
    heads = int(_get(config, "num_attention_heads", "n_head"))
    if family.qkv == "falcon":
        kv_heads = int(config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads))
    elif family.kv_heads:
        kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    else:
        kv_heads = heads
    head_dim = int(_get(config, "head_dim", default=hidden // heads))
    writer.add_context_length(int(_get(config, "max_position_embeddings", "n_positions", "max_seq_len", default=2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(widths[0] if len(set(widths)) == 1 else [int(w) for w in widths])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_vocab_size(n_vocab)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    eps = _get(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps")
    if eps is not None:
        (writer.add_layer_norm_eps if family.layer_norm else writer.add_layer_norm_rms_eps)(float(eps))
    extra = {}
    if family.rope is not None:
        full, sliding = _rope(config)
        factor = full.get("partial_rotary_factor", _get(config, "partial_rotary_factor", "rotary_pct", default=1.0))
        writer.add_rope_dimension_count(int(head_dim * float(factor)))
        if full.get("rope_theta") is not None:
            writer.add_rope_freq_base(float(full["rope_theta"]))
        if sliding and sliding.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        kind = full.get("rope_type", "default")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        elif kind == "llama3":
            extra["rope_freqs.weight"] = _llama3_rope_factors(config)
        elif kind != "default":
            raise InputError(f"rotary scaling {kind!r} is not supported by GGUF export yet (supported: default, linear, "
                             "llama3)")
    if getattr(config, "use_parallel_residual", None) is not None:
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    for path, source, default in family.metadata:
        value = source(config.to_dict()) if callable(source) else getattr(config, source, None)
        value = default if value is None else value
        if value is None:
            continue
        key = _key(path).format(arch=arch)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
    return extra


def _llama3_rope_factors(config) -> torch.Tensor:
    """Llama 3 rotary scaling as llama.cpp's ``rope_freqs`` (per-frequency divisors): the default inverse
    frequencies over the scaled ones, both computed by transformers' own rope initialisers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (base / scaled.double()).float()


# ---- tensors -----------------------------------------------------------------------------------

def _permute_rope(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' half-split rotary order to llama.cpp's adjacent-pair order.

    Per head, transformers rotates dimension ``j`` with ``j + d/2``; llama.cpp's ``norm`` rope rotates
    ``2j`` with ``2j + 1``: row ``j`` goes to ``2j`` and row ``j + d/2`` to ``2j + 1``.
    """
    rows = tensor.shape[0]
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _reorder_qkv(tensor: torch.Tensor, family: GgufFamily, config) -> torch.Tensor:
    """A packed query_key_value tensor as ``[q; k; v]`` rows (what llama.cpp splits)."""
    heads = int(_get(config, "num_attention_heads", "n_head"))
    rows, rest = tensor.shape[0], tensor.shape[1:]
    if family.qkv == "heads" or (family.qkv == "falcon" and not config.new_decoder_architecture
                                 and not config.multi_query):
        head_dim = rows // heads // 3
        return tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(rows, *rest)
    if family.qkv == "falcon" and config.new_decoder_architecture:
        groups = int(config.num_kv_heads)
        per = heads // groups
        head_dim = rows // (groups * (per + 2))
        grouped = tensor.reshape(groups, per + 2, head_dim, *rest)
        q = grouped[:, :per].reshape(groups * per * head_dim, *rest)
        k = grouped[:, per].reshape(groups * head_dim, *rest)
        v = grouped[:, per + 1].reshape(groups * head_dim, *rest)
        return torch.cat([q, k, v])
    return tensor  # Falcon multi-query: already [q heads; k; v]


def gguf_tensors(state: dict, family: GgufFamily, arch: str, config, conv1d: set[str]) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in transformers' [out, in] layout) for every tensor llama.cpp reads.

    Raises MlpfuseError for a tensor the gguf package's name map does not know (nothing is dropped
    silently); the output head is left out when it is tied to the embedding.
    """
    import gguf

    arch_enum = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    layers = int(_get(config, "num_hidden_layers", "n_layer"))
    names = gguf.get_tensor_name_map(arch_enum, layers)
    heads = int(_get(config, "num_attention_heads", "n_head"))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads)) if family.kv_heads else heads
    tied = bool(getattr(config, "tie_word_embeddings", False)) or family.tied_output
    out = []
    for key, tensor in state.items():
        if tied and key.endswith("lm_head.weight"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MlpfuseError(f"GGUF export: no llama.cpp name for tensor {key} of {config.model_type} ({arch})")
        tensor = tensor.detach().float()
        if key.rsplit(".", 1)[0] in conv1d and tensor.dim() == 2:
            tensor = tensor.T
        if family.norm_plus_one and "norm" in name and name.endswith(".weight"):
            tensor = tensor + 1.0
        if (family.rope == "norm" or arch == "deci") and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
            tensor = _permute_rope(tensor, heads if ".attn_q." in name else kv_heads)
        if family.qkv and name.endswith((".attn_qkv.weight", ".attn_qkv.bias")):
            tensor = _reorder_qkv(tensor, family, config)
        out.append((name, tensor.contiguous()))
    return out


def _encode(name: str, tensor: torch.Tensor, outtype: str):
    """(numpy data, raw ggml type or None) of one tensor in ``outtype``; 1D tensors (norms, biases) stay f32."""
    import gguf

    data = tensor.numpy().astype(np.float32)
    if data.ndim < 2 or outtype == "f32" or name == "rope_freqs.weight":
        return data, None
    if outtype == "f16":
        return data.astype(np.float16), None
    if outtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if data.shape[-1] % block == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None  # rows that do not fill whole Q8_0 blocks


_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# ---- checks ------------------------------------------------------------------------------------

def read_back(path: Path, expected: dict[str, tuple], metadata: dict) -> None:
    """Read ``path`` with ``gguf.GGUFReader`` and compare tensor names and shapes ([out, in] order) and
    metadata values with what was written. Raises MlpfuseError on any difference."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise MlpfuseError(f"the written GGUF does not hold the tensors written (missing {missing[:3]}, extra {extra[:3]})")
    for name, shape in expected.items():
        if got[name] != tuple(shape):
            raise MlpfuseError(f"the written GGUF's {name} has shape {got[name]}, {tuple(shape)} was written")
    for key, value in metadata.items():
        field_ = reader.fields.get(key)
        if field_ is None:
            raise MlpfuseError(f"the written GGUF lacks metadata {key}")
        read = field_.contents()
        if read != value:
            raise MlpfuseError(f"the written GGUF's {key} reads {read!r}, {value!r} was written")


def probe_prompts(directory: Path, vocab_size: int) -> tuple[list[str] | None, list[list[int]]]:
    """Token ids of :data:`PROMPTS` by the checkpoint's transformers tokenizer (as a user's would be)."""
    from mlpfuse.runtime import load_tokenizer

    tokenizer = load_tokenizer(directory)
    ids = [list(tokenizer(text)["input_ids"]) for text in PROMPTS]
    if all(ids) and max(max(i) for i in ids) < vocab_size:
        return list(PROMPTS), ids
    return None, [[(7 * i + 3 * j + 3) % max(vocab_size - 3, 1) + 3 for j in range(6)] for i in range(4)]


def reference_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    """Next-token logits [vocab] (fp32) of ``model`` after each prompt."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            out.append(logits.float().numpy())
    return out


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp):
    """Load models without llama.cpp's CPU "repack" buffers (``use_extra_bufts = False``).

    Repacking rearranges quantised weights for faster kernels at load time; it does not change what the
    file holds. With it, llama-cpp-python 0.3.36 crashes (SIGSEGV) evaluating any Q8_0 matrix product on
    an AVX-512 CPU, also for files quantised by llama.cpp's own ``llama_model_quantize`` (docs/deploy.md).
    llama-cpp-python's ``Llama`` has no argument for it, so its default-parameters function is wrapped
    for the duration of the load.
    """
    module = getattr(llama_cpp, "llama_cpp", None)
    original = getattr(module, "llama_model_default_params", None)
    if original is None:
        yield
        return

    def without_repack():
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_repack
    try:
        yield
    finally:
        module.llama_model_default_params = original


def llama_cpp_check(path: Path, prompts: list[list[int]], reference: list[np.ndarray], outtype: str,
                    texts: list[str] | None = None) -> dict | None:
    """Run the GGUF in llama-cpp-python on ``prompts`` and compare with ``reference``; None without llama_cpp.

    Returns ``runtime`` (llama_cpp version), ``top1_equal`` (per prompt), ``max_relative_diff`` (max over
    prompts of max |llama.cpp - ref| / max |ref|), ``tokens_agree`` (llama.cpp tokenises ``texts`` as the
    transformers tokenizer did; None without texts). Raises MlpfuseError when a top-1 token differs
    (f32/f16/bf16) or the difference exceeds ``TOLERANCE[outtype]``.
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    longest = max(len(p) for p in prompts)
    try:
        with plain_cpu_buffers(llama_cpp):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, longest + 8), n_batch=max(64, longest + 8),
                                  logits_all=True, verbose=False, n_threads=max(1, min(4, os.cpu_count() or 1)),
                                  seed=0)
    except Exception as exc:  # noqa: BLE001 - llama.cpp refusing the file is what this check is for
        raise MlpfuseError(f"llama.cpp cannot load the written GGUF: {exc}") from None
    try:
        top1, relative = [], 0.0
        for ids, ref in zip(prompts, reference):
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[len(ids) - 1], dtype=np.float32)
            if got.shape != ref.shape:
                raise MlpfuseError(f"llama.cpp gives {got.shape[0]} logits, transformers {ref.shape[0]}")
            top1.append(int(got.argmax()) == int(ref.argmax()))
            relative = max(relative, float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12)))
        agree = None
        if texts:
            agree = all(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == ids
                        for text, ids in zip(texts, prompts))
    finally:
        llm.close() if hasattr(llm, "close") else None
    result = {"runtime": f"llama-cpp-python {llama_cpp.__version__}", "prompts": len(prompts), "top1_equal": top1,
              "max_relative_diff": relative, "tolerance": TOLERANCE[outtype], "tokens_agree": agree}
    if (outtype != "q8_0" and not all(top1)) or not relative <= TOLERANCE[outtype]:
        raise MlpfuseError(f"llama.cpp's logits on the written GGUF differ from transformers': top-1 equal {top1}, "
                           f"max relative difference {relative:.3g} (tolerance {TOLERANCE[outtype]:g} for {outtype})")
    return result


# ---- export ------------------------------------------------------------------------------------

def export_gguf(model: str, output: str | Path, outtype: str = "f16", pad: bool = False, adapter: str | None = None,
                overwrite: bool = False) -> GgufReport:
    """Write fused checkpoint ``model`` as one GGUF file ``output`` that llama.cpp loads.

    ``outtype``: f32 | f16 | bf16 | q8_0 (weights of 2+ dimensions; norms and biases stay f32; q8_0
    rows not a multiple of 32 are f16). Widths: one per layer; differing widths are written per layer
    where the family's llama.cpp architecture reads them (LLaMA-shaped: as ``deci``), else refused
    unless ``pad``. Raises InputError (not fused, a family without a llama.cpp architecture, widths
    that need ``--pad``, no usable tokenizer, bad outtype), EnvironmentProblem (cannot write),
    MlpfuseError (the read-back or llama.cpp check failed: nothing is written).
    """
    import gguf

    start = time.perf_counter()
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    source = resolve_model(str(model))
    target = _claim_file(output, [source] + ([adapter] if adapter else []), overwrite)
    fused = load_fused_for_export(source, adapter)
    config = fused.config
    family = gguf_family(config.model_type)
    if family is None:
        raise InputError(f"GGUF export does not support {config.model_type!r}; supported: {supported_text()} "
                         "(for others, export to a transformers checkpoint: drop --format gguf)")
    problem = family.problem(config.to_dict())
    if problem:
        raise InputError(f"GGUF export of this {config.model_type} model: {problem}")
    cls = type(fused).__mro__[1]
    plain_config = config.__class__.from_dict({k: v for k, v in config.to_dict().items()
                                               if k not in ("mlpfuse", "architectures")})
    meta = _meta_model(cls, plain_config)
    conv1d = {name for name, module in meta.named_modules() if isinstance(module, Conv1D)}
    state, expert_pad = plain_state_dict(fused, meta)
    if expert_pad:
        raise InputError("GGUF export supports dense MLPs only (this model has experts)")
    fields = _width_fields(cls, plain_config)
    per_layer = layer_widths(state, fields)
    n_layers = int(_get(plain_config, "num_hidden_layers", "n_layer"))
    if sorted(per_layer) != list(range(n_layers)):
        raise MlpfuseError(f"GGUF export: found MLP widths for layers {sorted(per_layer)} of {n_layers}")
    distinct = sorted(set(per_layer.values()))
    arch, padding = family.arch, {}
    if len(distinct) > 1 and pad:
        _, padding = resolve_widths(state, fields, True, plain_config.model_type)
        per_layer = layer_widths(state, fields)
    elif len(distinct) > 1:
        if family.per_layer_arch is None:
            raise InputError(f"the fused MLPs have different widths ({', '.join(map(str, distinct))}) and llama.cpp's "
                             f"{family.arch} architecture reads one width for all layers; pass --pad to pad narrower "
                             f"ones with zero neurons to {distinct[-1]} (exact, costs parameters)")
        arch = family.per_layer_arch
    widths = [per_layer[i] for i in range(n_layers)]
    n_vocab = int(plain_config.vocab_size)

    from mlpfuse.deploy.gguf_vocab import load_vocab

    vocab = load_vocab(source, n_vocab)
    texts, prompts = probe_prompts(source, n_vocab)
    reference = reference_logits(fused.float(), prompts)  # fp32 reference whatever the checkpoint's dtype
    del fused

    temporary = _temporary_name(target)
    try:
        writer = gguf.GGUFWriter(str(temporary), arch)
        writer.add_name(Path(str(model)).name)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[outtype])))
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string(GGUF_MARK, str(model))
        extra = write_metadata(writer, plain_config, family, arch, widths, n_vocab)
        vocab.add_to(writer)
        tensors = gguf_tensors(state, family, arch, plain_config, conv1d) + list(extra.items())
        del state
        expected = {}
        for name, tensor in tensors:
            data, raw = _encode(name, tensor, outtype)
            if raw is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=raw)
            expected[name] = tuple(tensor.shape)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        key = gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)
        read_back(temporary, expected, {"general.architecture": arch, GGUF_MARK: str(model),
                                        key: widths[0] if len(set(widths)) == 1 else widths,
                                        gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch): n_layers,
                                        "tokenizer.ggml.model": vocab.model})
        check = llama_cpp_check(temporary, prompts, reference, outtype, texts)
        size = temporary.stat().st_size
        _commit(temporary, target, overwrite)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        problem = environment_problem(exc, target) if isinstance(exc, OSError) else None
        if problem is not None:
            raise problem from None
        raise
    return GgufReport(
        source=str(model), output=str(target), model_type=plain_config.model_type, arch=arch, outtype=outtype,
        widths=widths if len(set(widths)) > 1 else widths[:1], per_layer=len(set(widths)) > 1, padded=bool(padding),
        padding=padding, tensors=len(expected), bytes=size, adapter=adapter, check=check,
        tokenizer={"model": vocab.model, "pre": vocab.pre, "pre_known": vocab.pre_known, "tokens": len(vocab.tokens),
                   "padded": vocab.padded, "chat_template": vocab.special.chat_template is not None},
        seconds=time.perf_counter() - start)
