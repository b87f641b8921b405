"""Shared fixtures: tiny random models of every registered architecture, saved as checkpoints, and
random MLP weights for the methods' maths.

``TINY`` is the one table of tiny configs (name -> (config factory, task, MLP or expert width)); every
test that needs a tiny model builds it from here (``build_tiny``, ``tiny_config``), and
tests/test_registry.py runs every command on every entry. Adding an architecture: one registry
entry in mlpfuse/arch/registry.py and one line here (docs/adding-an-architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread (here and in the subprocesses tests start), unless OMP_NUM_THREADS says otherwise: tiny
# models gain nothing from more, and on a shared, busy CPU torch's threads spin waiting for each other (on
# 2 cores at load 4-5, test_finetune, test_ntk and test_kmeans took 71 s of CPU with 2 threads, 14 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 99


T = transformers


def _config(cls, **defaults):
    """A config factory: ``factory(**overrides)`` builds ``cls`` from ``defaults`` updated by ``overrides``."""
    return lambda **overrides: cls(**{"vocab_size": VOCAB, **defaults, **overrides})


# A two-layer LLaMA-shaped decoder (hidden 32, MLP width 44).
_DECODER = dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_T5 = dict(d_model=32, d_kv=8, d_ff=36, num_layers=2, num_decoder_layers=2, num_heads=4)

# name -> (config factory, task used to build and load it, MLP width (the routed experts' for MoE))
TINY = {
    "bert": (_config(T.BertConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64), "masked-lm", 37),
    "roberta": (_config(T.RobertaConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                        max_position_embeddings=70, pad_token_id=1), "sequence-classification", 40),
    "gpt2": (_config(T.GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
             "causal-lm", 128),
    **{name: (_config(cls, **{**_DECODER, **extra}), "causal-lm", 44) for name, cls, extra in (
        ("llama", T.LlamaConfig, {}),
        ("mistral", T.MistralConfig, {}),
        ("qwen2", T.Qwen2Config, {}),
        ("qwen3", T.Qwen3Config, dict(head_dim=8)),
        ("gemma", T.GemmaConfig, dict(head_dim=8)),
        ("gemma2", T.Gemma2Config, dict(head_dim=8)),
        ("gemma3_text", T.Gemma3TextConfig, dict(head_dim=8)),
        ("olmo", T.OlmoConfig, {}),
        ("olmo2", T.Olmo2Config, {}),
        ("olmo3", T.Olmo3Config, {}),
        ("granite", T.GraniteConfig, {}),
        ("stablelm", T.StableLmConfig, {}),
        ("cohere", T.CohereConfig, {}),
        ("cohere2", T.Cohere2Config, {}),
        ("helium", T.HeliumConfig, dict(head_dim=8)),
        ("smollm3", T.SmolLM3Config, {}),
        ("ministral", T.MinistralConfig, dict(head_dim=8)),
        ("exaone4", T.Exaone4Config, {}),
        ("seed_oss", T.SeedOssConfig, dict(head_dim=8)),
        ("nemotron", T.NemotronConfig, {}),
        ("arcee", T.ArceeConfig, {}),
        ("apertus", T.ApertusConfig, {}),
        ("phi3", T.Phi3Config, {}),
        ("glm", T.GlmConfig, dict(head_dim=8)),
        ("phi", T.PhiConfig, {}),
        ("gpt_neox", T.GPTNeoXConfig, {}),
        ("persimmon", T.PersimmonConfig, {}),
        ("starcoder2", T.Starcoder2Config, {}),
    )},
    "falcon": (_config(T.FalconConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=44),
               "causal-lm", 44),
    "bloom": (_config(T.BloomConfig, hidden_size=32, n_layer=2, n_head=4), "causal-lm", 128),
    "opt": (_config(T.OPTConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=44,
                    word_embed_proj_dim=32, max_position_embeddings=64), "causal-lm", 44),
    "gptj": (_config(T.GPTJConfig, n_embd=32, n_layer=2, n_head=4, n_inner=44, rotary_dim=4, n_positions=64),
             "causal-lm", 44),
    "codegen": (_config(T.CodeGenConfig, n_embd=32, n_layer=2, n_head=4, n_inner=44, rotary_dim=4, n_positions=64, n_ctx=64),
                "causal-lm", 44),
    "gpt_neo": (_config(T.GPTNeoConfig, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=44,
                        attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64),
                "causal-lm", 44),
    "t5": (_config(T.T5Config, **_T5, feed_forward_proj="relu"), "seq2seq-lm", 36),
    "t5-gated": (_config(T.T5Config, **_T5, feed_forward_proj="gated-gelu"), "seq2seq-lm", 36),
}

# Mixture-of-Experts families: hidden MOE_H, expert width MOE_I, MOE_E experts (tests/test_moe.py).
MOE_H, MOE_I, MOE_E, MOE_SHARED_I = 16, 12, 4, 20
_MOE_DECODER = dict(hidden_size=MOE_H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY.update({
    "mixtral": (_config(T.MixtralConfig, intermediate_size=MOE_I, num_local_experts=MOE_E, **_MOE_DECODER),
                "causal-lm", MOE_I),
    "qwen2_moe": (_config(T.Qwen2MoeConfig, intermediate_size=24, moe_intermediate_size=MOE_I, num_experts=MOE_E,
                          shared_expert_intermediate_size=MOE_SHARED_I, **_MOE_DECODER), "causal-lm", MOE_I),
    "qwen3_moe": (_config(T.Qwen3MoeConfig, intermediate_size=24, moe_intermediate_size=MOE_I, num_experts=MOE_E,
                          head_dim=8, **_MOE_DECODER), "causal-lm", MOE_I),
    "olmoe": (_config(T.OlmoeConfig, intermediate_size=MOE_I, num_experts=MOE_E, **_MOE_DECODER), "causal-lm", MOE_I),
    # 4 blocks, 2 sparse (blocks 1 and 3) in encoder and decoder
    "switch_transformers": (_config(
        T.SwitchTransformersConfig, d_model=MOE_H, d_ff=MOE_I, d_kv=8, num_layers=4, num_decoder_layers=4, num_heads=2,
        num_experts=MOE_E, expert_capacity=64, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "seq2seq-lm", MOE_I),
})
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers")
DENSE_FAMILIES = [name for name in TINY if name not in MOE_FAMILIES]


def tiny_config(name: str, **overrides):
    """The tiny config of family ``name``, built with its constructor arguments updated by ``overrides``."""
    return TINY[name][0](**overrides)


def build_tiny(name: str, seed: int = 0, **overrides):
    """A tiny random model (eval mode) of registry family ``name`` and its task (config ``overrides`` applied)."""
    _, task, _ = TINY[name]
    factory = lambda: tiny_config(name, **overrides)  # noqa: E731
    torch.manual_seed(seed)
    auto = getattr(transformers, {"masked-lm": "AutoModelForMaskedLM", "sequence-classification":
                                  "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                                  "seq2seq-lm": "AutoModelForSeq2SeqLM"}[task])
    return auto.from_config(factory()).eval(), task


def tiny_config_dict(name: str, **overrides) -> dict:
    """The tiny config of family ``name`` as a plain dict (``model_type`` and what differs from the
    defaults), the form ``mlpfuse.analysis.bench.preset_sources`` takes."""
    return tiny_config(name, **overrides).to_diff_dict()


def model_inputs(name: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    if TINY[name][1] == "seq2seq-lm":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def outputs_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal's foreground job.

    A pytest started in the background from a script (``pytest &``) inherits SIGINT ignored, and a test
    that sends itself SIGINT would then see nothing happen.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a tiny model of family ``name`` and return (directory, model, task)."""

    def make(name: str, seed: int = 0):
        model, task = build_tiny(name, seed)
        directory = tmp_path / f"{name}-src"
        model.save_pretrained(directory)
        return directory, model, task

    return make


# ---- random MLP weights (one MLP block as MLPWeights, no model around it)

def random_mlp(width: int = 48, hidden: int = 12, gated: bool = False, seed: int = 0, bias: bool | None = None,
               small: bool = False, dtype: torch.dtype = torch.float64):
    """Random ``MLPWeights`` (w_in, w_out: width x hidden and hidden x width; w_gate when ``gated``).

    ``bias`` (default: not gated, as BERT-style MLPs have biases and LLaMA-style gated ones do not)
    adds b_in and b_out. ``small`` scales the N(0, 1) draws (w_in and w_gate by 1/3, w_out by 1/6,
    biases by 1/5) so pre-activations of a few units sit where the activation is neither linear
    nor saturated."""
    from mlpfuse.compress.mlp import MLPWeights

    bias = not gated if bias is None else bias
    g = torch.Generator().manual_seed(seed)
    draw = lambda factor, *shape: torch.randn(*shape, generator=g, dtype=dtype) * (factor if small else 1)  # noqa: E731
    w_in, b_in = draw(1 / 3, width, hidden), draw(1 / 5, width) if bias else None
    w_out, b_out = draw(1 / 6, hidden, width), draw(1 / 5, hidden) if bias else None
    return MLPWeights(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, w_gate=draw(1 / 3, width, hidden) if gated else None)


def repeat_neurons(mlp, order: torch.Tensor):
    """``mlp`` with neuron ``order[j]`` as its neuron j (rows of w_in, b_in, w_gate; columns of w_out)."""
    return mlp.map_neurons(lambda t: t[order].clone(), lambda w: w[:, order].clone())


WORDS = [f"w{i}" for i in range(60)]


def save_tokenizer(directory: Path) -> None:
    """A small WordPiece tokenizer (ids < VOCAB) saved into ``directory``, for commands that read text."""
    vocab = Path(directory) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)


def tree_digest(directory: Path) -> str:
    """Hash of every file's name and bytes under ``directory`` (to prove an input is untouched)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ---- checkpoints and text for the commands that read text (tune, finetune, output safety, ...)

TEXT_WORDS = "good bad great awful fine movie film plot actor boring funny sad long short dull bright".split()


def write_texts(path: Path, rows: int = 48, seed: int = 0, labels=("pos", "neg"), pair: bool = False) -> Path:
    """A small TSV of random English word sentences with a label column (and optionally a pair column)."""
    rng = random.Random(seed)
    header = ["sentence", "label"] + (["sentence2"] if pair else [])
    lines = ["\t".join(header)]
    for _ in range(rows):
        row = [" ".join(rng.choice(TEXT_WORDS) for _ in range(rng.randint(2, 9))), rng.choice(labels)]
        if pair:
            row.append(" ".join(rng.choice(TEXT_WORDS) for _ in range(rng.randint(2, 6))))
        lines.append("\t".join(str(v) for v in row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_checkpoints(directory: Path, kind: str = "bert", seed: int = 0, layers: str = "all",
                     dim: int = 16) -> tuple[Path, Path]:
    """A tiny original model (with the bundled MiniLM tokenizer) and its fused copy (``layers`` at width
    ``dim``), saved; ``kind`` bert (BertModel, MLP width 64) or llama (LlamaForCausalLM, MLP width 48)."""
    from mlpfuse.compress.fuse import FuseSettings, fuse_model
    from mlpfuse.checkpoints.source import bundled_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bundled_model_path()))
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "bert":
        model = transformers.BertModel(tiny_config("bert", vocab_size=vocab, intermediate_size=64))
    else:
        config = tiny_config("llama", vocab_size=vocab, intermediate_size=48, pad_token_id=tokenizer.pad_token_id)
        model = transformers.LlamaForCausalLM(config)
    original, fused = directory / f"{kind}-original", directory / f"{kind}-fused"
    model.save_pretrained(original)
    tokenizer.save_pretrained(original)
    fuse_model(model, FuseSettings(layers=layers, dim=dim, seed=0))
    model.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    return original, fused


def slow_kernels(model, site, inputs, scalar):
    """Adam and SGD NTK of ``site``'s parameters by one plain autograd pass per sample (ntk-check's reference)."""
    from mlpfuse.analysis.ntk import _forward

    base = model.base_model
    params = [p for module in site.modules for p in base.get_submodule(module.path).parameters()]
    rows = []
    for i in range(inputs["input_ids"].shape[0]):
        sample = {k: v[i:i + 1] for k, v in inputs.items()}
        outputs, hidden = _forward(model, sample)
        value = scalar(outputs, hidden, sample["attention_mask"])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    g = torch.stack(rows).double()
    return g @ g.sign().T, g @ g.T
