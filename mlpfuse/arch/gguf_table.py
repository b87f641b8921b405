"""What llama.cpp calls each supported family, and how its GGUF differs from the transformers checkpoint.

One entry per transformers ``model_type`` (``GGUF_FAMILIES``). The facts come from llama.cpp's model
loaders (``src/models/*.cpp`` of the llama.cpp bundled in llama-cpp-python 0.3.36): the architecture
name, which rotary layout it applies (``norm``: pairs of adjacent dimensions, so transformers' q/k rows,
which rotate the two halves of each head, are permuted; ``neox``: halves, as transformers), whether its
norms are stored as ``w`` but applied as ``1 + w`` (Gemma), the packed attention layout it reads, and the
extra metadata it needs. Tensor names come from the gguf package's own map (``gguf.get_tensor_name_map``),
not from here. ``mlpfuse.deploy.gguf_export`` applies these facts; ``mlpfuse.deploy.deployinfo`` reports them.

Per-layer MLP widths: llama.cpp reads ``{arch}.feed_forward_length`` as one value or one per layer, but
most architectures size every layer's FFN tensors from layer 0's value. ``deci`` (LLaMA with per-layer
widths, written for Nemotron-NAS) sizes each layer from its own value and computes a LLaMA block
(RMSNorm, SiLU-gated MLP, ``norm`` rotary, optional q/k/v biases), so LLaMA-shaped families with
differing widths are written as ``deci`` (``per_layer_arch``; Qwen2 too: its q/k rows are then permuted
to ``norm`` order like LLaMA's). The others need ``--pad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# GGUF metadata keys are the gguf package's templates (``gguf.Keys``), named here by attribute path so
# this table stays free of imports; ``mlpfuse.deploy.gguf_export`` resolves them.


@dataclass(frozen=True)
class GgufFamily:
    """How one transformers family becomes a GGUF that llama.cpp runs.

    ``arch``: llama.cpp architecture name (a value of ``gguf.MODEL_ARCH_NAMES``). ``rope``: ``"norm"``
    (adjacent pairs: q/k weight rows and biases permuted per head), ``"neox"`` (halves, as in
    transformers) or None (no rotary). ``layer_norm``: the family's norms are LayerNorm (eps key
    ``layer_norm_epsilon``) rather than RMSNorm (``layer_norm_rms_epsilon``). ``norm_plus_one``: norm
    weights are applied as ``1 + w`` by transformers and as ``w`` by llama.cpp, so ``w + 1`` is written.
    ``qkv``: layout of a packed query_key_value tensor that must be reordered to ``[q; k; v]``
    (``"heads"``: ``[heads, 3, head_dim]`` rows, GPT-NeoX; ``"groups"``: ``[kv_heads, q_per_kv + 2,
    head_dim]``, Falcon's new decoder architecture). ``per_layer_arch``: the architecture written when MLP
    widths differ across layers (None: ``--pad`` needed). ``conv1d``: weights are GPT-2 ``Conv1D``
    ([in, out]) and are transposed. ``metadata``: extra keys as (gguf.Keys attribute path, config field
    or callable of the config dict, default) triples. ``tied_output``: llama.cpp always reuses the
    embedding as the output (no ``output.weight`` is written).
    """

    arch: str
    rope: str | None = "neox"
    layer_norm: bool = False
    norm_plus_one: bool = False
    qkv: str | None = None
    per_layer_arch: str | None = None
    conv1d: bool = False
    metadata: tuple = field(default_factory=tuple)
    tied_output: bool = False
    kv_heads: bool = True
    check: object = None
    note: str = ""

    def problem(self, config: dict) -> str | None:
        """Why llama.cpp would compute something else for this config (None: it computes the same)."""
        return self.check(config) if self.check else None


def _sliding_window(config: dict):
    return config.get("sliding_window")


def _swa_pattern_gemma3(config: dict):
    """Gemma 3: which layers use sliding-window attention (True) from ``layer_types``."""
    types = config.get("layer_types")
    return [t == "sliding_attention" for t in types] if types else None


def _gemma_attention_scale(config: dict):
    """llama.cpp scales Gemma 2/3 attention by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 27B
    models); transformers by 1/sqrt(query_pre_attn_scalar)."""
    scalar = config.get("query_pre_attn_scalar")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if scalar is None or scalar in (head_dim, config["hidden_size"] // config["num_attention_heads"]):
        return None
    return (f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim}: llama.cpp scales attention by "
            "1/sqrt(head_dim), so it would compute a different model")


_GRANITE = (
    ("LLM.EMBEDDING_SCALE", "embedding_multiplier", 1.0),
    ("LLM.RESIDUAL_SCALE", "residual_multiplier", 1.0),
    ("Attention.SCALE", "attention_multiplier", None),
    ("LLM.LOGIT_SCALE", "logits_scaling", 1.0),
)
_GEMMA2 = (
    ("LLM.ATTN_LOGIT_SOFTCAPPING", "attn_logit_softcapping", None),
    ("LLM.FINAL_LOGIT_SOFTCAPPING", "final_logit_softcapping", None),
    ("Attention.SLIDING_WINDOW", _sliding_window, None),
)
_GEMMA3 = (
    ("LLM.FINAL_LOGIT_SOFTCAPPING", "final_logit_softcapping", None),
    ("Attention.SLIDING_WINDOW", _sliding_window, None),
    ("Attention.SLIDING_WINDOW_PATTERN", _swa_pattern_gemma3, None),
)

GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama", rope="norm", per_layer_arch="deci", note="SmolLM, Llama 2/3"),
    "mistral": GgufFamily("llama", rope="norm", per_layer_arch="deci",
                          note="written as llama (llama.cpp has no separate Mistral architecture); sliding window ignored"),
    "qwen2": GgufFamily("qwen2", per_layer_arch="deci"),
    "qwen3": GgufFamily("qwen3"),
    "gemma": GgufFamily("gemma", norm_plus_one=True, tied_output=True),
    "gemma2": GgufFamily("gemma2", norm_plus_one=True, tied_output=True, metadata=_GEMMA2,
                         check=_gemma_attention_scale),
    "gemma3_text": GgufFamily("gemma3", norm_plus_one=True, tied_output=True, metadata=_GEMMA3,
                              check=_gemma_attention_scale),
    "phi3": GgufFamily("phi3"),
    "olmo2": GgufFamily("olmo2"),
    "granite": GgufFamily("granite", rope="norm", metadata=_GRANITE),
    "stablelm": GgufFamily("stablelm", layer_norm=True),
    "gpt2": GgufFamily("gpt2", rope=None, layer_norm=True, conv1d=True, kv_heads=False),
    "gpt_neox": GgufFamily("gptneox", layer_norm=True, qkv="heads", kv_heads=False),
    "falcon": GgufFamily("falcon", layer_norm=True, qkv="groups"),
    "starcoder2": GgufFamily("starcoder2", layer_norm=True),
}


def gguf_family(model_type: str) -> GgufFamily | None:
    """The GGUF facts of a transformers ``model_type``, or None when mlpfuse cannot write it as GGUF."""
    return GGUF_FAMILIES.get(model_type)


def supported_text() -> str:
    """The supported model types, for error messages and docs."""
    return ", ".join(sorted(GGUF_FAMILIES))
