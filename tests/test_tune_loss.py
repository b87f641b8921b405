"""`tune` for decoder LLMs: the variance-normalised, first-token-aware loss, the optional KL term,
the skipped LM head, and the before/after report on held-out text."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import mlpfuse
from mlpfuse.cli import app
from mlpfuse.train.tune import (TuneSettings, first_changed_state, hidden_error, layerwise_loss, logit_kl, token_weights,
                          tune_checkpoint, tune_model)
from mlpfuse.train.tune import _encode
from mlpfuse.train.tune_kl import chunked_logit_kl, kl_heads, last_hidden_state

from .conftest import TINY, build_tiny, make_checkpoints, model_inputs, write_texts
from .test_bad_input import assert_one_line_error

runner = CliRunner()


def _states(seed: int = 0, layers: int = 4, shape=(2, 5, 6)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(layers)]


MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


# --- the loss ---------------------------------------------------------------------------------

def test_variance_loss_is_unchanged_when_a_layer_is_scaled_but_plain_mse_is_not():
    student, teacher = _states(0), _states(1)
    scaled_student, scaled_teacher = list(student), list(teacher)
    scaled_student[2], scaled_teacher[2] = student[2] * 300.0, teacher[2] * 300.0  # a massive-activation layer
    variance = layerwise_loss(student, teacher, MASK, layer_loss="variance")
    assert layerwise_loss(scaled_student, scaled_teacher, MASK, layer_loss="variance") == pytest.approx(variance.item(), rel=1e-5)
    mse = layerwise_loss(student, teacher, MASK, layer_loss="mse")
    assert layerwise_loss(scaled_student, scaled_teacher, MASK, layer_loss="mse") > 1000 * mse


def test_variance_loss_is_a_relative_error():
    """Predicting each hidden unit's mean over the tokens scores exactly 1 (per layer, so also on average)."""
    teacher = _states(1)
    mask = torch.ones(2, 5, dtype=torch.long)
    means = [t.mean(dim=(0, 1), keepdim=True).expand_as(t) for t in teacher]
    assert layerwise_loss(means, teacher, mask, layer_loss="variance").item() == pytest.approx(1.0, rel=1e-5)
    assert layerwise_loss(teacher, teacher, mask, layer_loss="variance").item() == 0


def test_layers_before_the_first_fused_one_do_not_count():
    student, teacher = _states(0), _states(1)
    changed = list(student)
    changed[1] = student[1] + 50.0
    for loss in ("variance", "mse"):
        base = layerwise_loss(student, teacher, MASK, first_layer=2, layer_loss=loss)
        assert layerwise_loss(changed, teacher, MASK, first_layer=2, layer_loss=loss) == pytest.approx(base.item())
        assert layerwise_loss(changed, teacher, MASK, first_layer=1, layer_loss=loss) > base


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_first_token_weight_scales_the_first_real_token(padding_side):
    student, teacher = _states(0, layers=2), _states(1, layers=2)
    mask = MASK if padding_side == "right" else MASK.flip(1)
    first = 1 if padding_side == "left" else 0  # row 0's first non-padding position
    assert token_weights(mask, 0.25)[0, first] == 0.25 and token_weights(mask, 0.25)[1, 0] == 0.25
    assert token_weights(mask, 0.25).sum() == mask.sum() - 2 + 0.5

    moved = [s.clone() for s in student]
    moved[1][0, first] += 1000.0
    # masked: the first tokens' errors do not count at all
    assert layerwise_loss(moved, teacher, mask, first_token_weight=0.0) == pytest.approx(
        layerwise_loss(student, teacher, mask, first_token_weight=0.0).item())
    # weighted: the first token's squared error counts w times, over a total weight of (tokens - 2 + 2w)
    w = 0.25
    errors = ((student[1] - teacher[1]) ** 2).sum(-1)
    weights = token_weights(mask, w)
    expected = (errors * weights).sum() / (weights.sum() * student[1].shape[-1])
    assert layerwise_loss(student, teacher, mask, first_token_weight=w, layer_loss="mse").item() == pytest.approx(expected.item())
    assert layerwise_loss(moved, teacher, mask, first_token_weight=w) > layerwise_loss(student, teacher, mask, first_token_weight=w)


def test_logit_kl_is_zero_for_equal_logits_and_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    assert logit_kl(teacher, teacher, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kl(student, teacher, MASK) > 0
    padded = student.clone()
    padded[0, 4] += 100.0  # a padding position
    assert logit_kl(padded, teacher, MASK).item() == pytest.approx(logit_kl(student, teacher, MASK).item())


# --- tiny models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_last_layer(tmp_path_factory):
    """A tiny LLaMA (2 layers) with only its last MLP fused, its original, and a TSV."""
    directory = tmp_path_factory.mktemp("tune-llama")
    original, fused = make_checkpoints(directory, kind="llama", layers="1", dim=8)
    return original, fused, write_texts(directory / "text.tsv", rows=64)


def test_first_changed_state_is_the_output_of_the_first_fused_layer(llama_last_layer, tmp_path):
    original, fused, _ = llama_last_layer
    assert first_changed_state(mlpfuse.load(fused, task="causal-lm")) == 2  # hidden_states[2]: layer 1's output
    _, all_fused = make_checkpoints(tmp_path, kind="llama")
    assert first_changed_state(mlpfuse.load(all_fused, task="causal-lm")) == 1


def test_without_kl_the_lm_head_is_never_called(llama_last_layer):
    original, fused, _ = llama_last_layer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    texts = ["good movie", "bad plot and a long dull film", "fine"] * 2
    calls = []

    def run(kl_weight: float) -> float:
        student = mlpfuse.load(fused, task="causal-lm")
        teacher = mlpfuse.load(original, task="causal-lm")
        calls.clear()
        for model in (student, teacher):
            model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
        result = tune_model(student, teacher, tokenizer, texts, TuneSettings(batch_size=3, lr=1e-3, kl_weight=kl_weight))
        return result["initial_loss"]

    without = run(0.0)
    assert calls == []
    with_kl = run(1.0)
    # the check of the chunked heads (full forward + head, teacher and student), then per step each
    # head once in the forward and once more in the checkpointed backward (one chunk at this size)
    assert len(calls) == 4 + 2 * 4
    assert with_kl > without  # the KL term adds to the same first-step layer loss


def test_tune_lowers_the_held_out_error_and_reports_it(llama_last_layer, tmp_path):
    original, fused, data = llama_last_layer
    held_out = write_texts(tmp_path / "held-out.tsv", rows=16, seed=7)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    texts = [line.split("\t")[0] for line in held_out.read_text().splitlines()[1:]]
    teacher = mlpfuse.load(original, task="causal-lm").eval()
    before = hidden_error(mlpfuse.load(fused, task="causal-lm").eval(), teacher, tokenizer, texts)
    report = tune_checkpoint(str(fused), str(original), str(data), tmp_path / "tuned",
                             TuneSettings(lr=3e-3, batch_size=8, max_length=16, epochs=3, eval_data=str(held_out)))
    after = hidden_error(mlpfuse.load(tmp_path / "tuned", task="causal-lm").eval(), teacher, tokenizer, texts)
    assert 0 < after < before
    # the report: perplexity of the student before and after (and the teacher's) on the 16 held-out rows
    assert report.evaluation == {"data": str(held_out), "rows": 16, "held_out": True}
    assert set(report.before) == set(report.after) == {"perplexity", "mean_nll", "tokens"}
    assert report.before["perplexity"] != report.after["perplexity"]
    assert report.reference["perplexity"] > 0
    record = json.loads((tmp_path / "tuned" / "config.json").read_text())["mlpfuse"]["tuning"]
    assert record["after"] == report.after and record["layer_loss"] == "variance"
    # a causal LM tunes on packed 16-token windows of the joined rows by default
    assert record["packed"] is True and record["sequences"] < record["rows"]
    assert record["kl_weight"] == 1.0  # the causal-LM default adds the logit KL


def test_pack_texts_gives_the_eval_protocols_windows(llama_last_layer):
    from mlpfuse.train.evaluate import token_ids
    from mlpfuse.train.tune import _encode, pack_texts

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(llama_last_layer[1]))
    rows = ["good movie", "a long and dull plot", "fine", "bright funny actor"] * 30  # more than 64 rows
    windows = pack_texts(tokenizer, rows, 8)
    ids = tokenizer("\n".join(rows), add_special_tokens=False)["input_ids"]
    assert [i for w in windows for i in w] == ids[:len(ids) // 8 * 8 + (len(ids) % 8 if len(ids) % 8 > 1 else 0)]
    assert ids[:4096] == token_ids(tokenizer, rows, 4096)[:len(ids)]
    assert all(len(w) == 8 for w in windows[:-1]) and 2 <= len(windows[-1]) <= 8
    encoded = _encode(tokenizer, windows[-2:], 8, "cpu")
    assert encoded["attention_mask"][0].sum() == 8 and encoded["attention_mask"][1].sum() == len(windows[-1])
    assert encoded["input_ids"][1, :len(windows[-1])].tolist() == windows[-1]


def test_cli_json_has_before_and_after_for_an_encoder(tmp_path):
    original, fused = make_checkpoints(tmp_path)
    data = write_texts(tmp_path / "text.tsv", rows=40)
    result = runner.invoke(app, ["tune", str(fused), "--teacher", str(original), "--data", str(data), "-o",
                                 str(tmp_path / "out"), "--limit", "32", "--batch-size", "8", "--lr", "3e-3",
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    # the 8 rows after --limit 32 are held out
    assert report["evaluation"] == {"data": str(data), "first_row": 32, "rows": 8, "held_out": True}
    assert report["after"]["hidden_error"] < report["before"]["hidden_error"]
    assert report["reference"] is None
    assert report["settings"]["kl_weight"] == 0.0 and report["settings"]["pack"] is False  # encoder defaults
    assert report["settings"]["layer_loss"] == "mse"
    assert "hidden-state relative error" in result.stderr  # the human lines go to stderr with --json -

    no_report = runner.invoke(app, ["tune", str(fused), "--teacher", str(original), "--data", str(data), "-o",
                                    str(tmp_path / "out2"), "--max-steps", "1", "--eval-rows", "0", "--json", "-"])
    assert no_report.exit_code == 0, no_report.output
    report = json.loads(no_report.stdout[no_report.stdout.index("{"):])
    assert report["before"] is None and report["after"] is None


def test_whole_file_tuning_reports_on_its_tail_marked_not_held_out(tmp_path):
    original, fused = make_checkpoints(tmp_path)
    data = write_texts(tmp_path / "text.tsv", rows=12)
    report = tune_checkpoint(str(fused), str(original), str(data), tmp_path / "out",
                             TuneSettings(batch_size=4, max_steps=1, eval_rows=5))
    assert report.evaluation == {"data": str(data), "first_row": 7, "rows": 5, "held_out": False}


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tune-bad")
    original, fused = make_checkpoints(directory)
    return original, fused, write_texts(directory / "text.tsv", rows=16)


@pytest.mark.parametrize("extra, fragment", [
    (["--layer-loss", "cosine"], "--layer-loss must be one of variance, mse"),
    (["--first-token-weight", "-1"], "--first-token-weight must be a number >= 0"),
    (["--first-token-weight", "nan"], "--first-token-weight must be a number >= 0"),
    (["--kl-weight", "-0.5"], "--kl-weight must be a number >= 0"),
    (["--kl-temperature", "0"], "--kl-temperature must be a number > 0"),
    (["--eval-rows", "-2"], "--eval-rows must be an integer >= 0"),
    (["--eval-data", "missing.tsv"], "missing.tsv not found"),
    (["--kl-weight", "1"], "needs a causal language model"),  # the tiny BERT is an encoder
    (["--pack"], "leave --pack off"),
])
def test_bad_new_tune_options(extra, fragment, bert_files, tmp_path):
    original, fused, data = bert_files
    output = tmp_path / "tuned"
    result = runner.invoke(app, ["tune", str(fused), "--teacher", str(original), "--data", str(data), "-o", str(output),
                                 "--batch-size", "8", "--max-steps", "1",
                                 *[str(tmp_path / e) if e == "missing.tsv" else e for e in extra]])
    assert_one_line_error(result, 2, fragment, output)


def test_the_student_replays_the_teachers_early_layers_with_the_same_loss(llama_last_layer):
    """Layers before the first fused one are identical: the student takes the teacher's outputs for
    them (never runs them), and the loss is exactly the one of a full student forward."""
    from mlpfuse.train.tune import _batch_loss, _encode, _forward, shared_layers

    original, fused, _ = llama_last_layer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    student, teacher = mlpfuse.load(fused, task="causal-lm").eval(), mlpfuse.load(original, task="causal-lm").eval()
    assert shared_layers(student) == ("layers", 1)
    encoded = _encode(tokenizer, ["good movie", "a long and dull plot"], 16, "cpu")
    settings = TuneSettings(first_token_weight=0.5, kl_weight=0.0, layer_loss="variance")
    with torch.no_grad():
        full = layerwise_loss(_forward(student, encoded, False)[0], _forward(teacher, encoded, False)[0],
                              encoded["attention_mask"], first_layer=2, first_token_weight=0.5, layer_loss="variance")
    calls = []
    student.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(0))
    student.model.layers[1].self_attn.register_forward_hook(lambda *args: calls.append(1))
    replayed = _batch_loss(student, teacher, encoded, settings, first_layer=2)
    assert calls == [1]
    assert replayed.item() == pytest.approx(full.item(), rel=1e-6) and replayed.item() > 0
    replayed.backward()
    assert student.model.layers[1].mlp.up_proj.weight.grad is not None
    assert "forward" not in vars(student.model.layers[0])  # the layer computes again afterwards


# --- the chunked KL (memory that does not grow with the vocabulary) ----------------------------

def _kl_pair(name: str, **overrides):
    """A tiny teacher of family ``name`` and a student: the same model with its last layer's weights nudged."""
    teacher, _ = build_tiny(name, seed=0, **overrides)
    student, _ = build_tiny(name, seed=0, **overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name_, parameter in student.named_parameters():
            if ".1." in name_ and parameter.dim() == 2:  # layer 1 (every family here names it so)
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return student, teacher


def _kl_and_grads(student, loss_of) -> tuple[float, dict]:
    student.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, overrides", [
    ("llama", {}),
    ("gemma2", {"final_logit_softcapping": 0.3}),  # a cap small enough to bend the tiny model's logits
    ("gpt2", {}),
])
def test_chunked_kl_equals_the_full_logits_kl_in_loss_and_gradients(name, overrides):
    student, teacher = _kl_pair(name, **overrides)
    inputs = model_inputs(name, batch=2, length=7)  # 12 real tokens (row 0 ends in 2 padding positions)
    mask = inputs["attention_mask"]
    heads = kl_heads(student, teacher, inputs)
    assert heads is not None
    heads = dataclasses.replace(heads, chunk=5)  # 3 chunks, the last one short
    with torch.no_grad():
        teacher_logits, teacher_hidden = teacher(**inputs).logits, last_hidden_state(teacher, inputs)
    full, full_grads = _kl_and_grads(student, lambda: logit_kl(student(**inputs).logits, teacher_logits, mask, 2.0))
    chunked, chunked_grads = _kl_and_grads(student, lambda: chunked_logit_kl(
        last_hidden_state(student, inputs), teacher_hidden, heads, mask, 2.0))
    assert full > 1e-4 and chunked == pytest.approx(full, rel=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 4
    for key, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)
    if overrides:  # the softcapping matters here: the bare projection does not give the model's logits
        with torch.no_grad():
            projected = teacher.get_output_embeddings()(teacher_hidden)
            assert not torch.allclose(projected, teacher(**inputs).logits, atol=1e-3)


def test_chunked_kl_ignores_padding_positions():
    student, teacher = _kl_pair("llama")
    inputs = model_inputs("llama", batch=2, length=7)
    other = {**inputs, "input_ids": inputs["input_ids"].clone()}
    other["input_ids"][0, -2:] = 5  # other tokens at row 0's (right) padding positions
    heads = dataclasses.replace(kl_heads(student, teacher, inputs), chunk=4)
    with torch.no_grad():
        values = [chunked_logit_kl(last_hidden_state(student, batch), last_hidden_state(teacher, batch), heads,
                                   batch["attention_mask"]).item() for batch in (inputs, other)]
        full = logit_kl(student(**inputs).logits, teacher(**inputs).logits, inputs["attention_mask"]).item()
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("name", [name for name in TINY if TINY[name][1] == "causal-lm"])
def test_every_registered_causal_family_gets_the_chunked_kl(name):
    """Each family's head (projection plus its config's logit scaling or softcapping) gives the model's logits."""
    model, _ = build_tiny(name)
    assert kl_heads(model, model, model_inputs(name)) is not None


class _ScaledLlama(transformers.LlamaForCausalLM):
    """A causal LM whose logits are something the chunked heads do not know of."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_head_the_chunked_kl_does_not_know_falls_back_to_the_full_logits(llama_last_layer):
    original, fused, _ = llama_last_layer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    student, teacher = mlpfuse.load(fused, task="causal-lm"), mlpfuse.load(original, task="causal-lm")
    inputs = _encode(tokenizer, ["good movie"], 16, "cpu")
    assert kl_heads(student, teacher, inputs) is not None
    scaled = _ScaledLlama(teacher.config).eval()
    scaled.load_state_dict(teacher.state_dict())
    assert kl_heads(student, scaled, inputs) is None
    texts = ["good movie", "bad plot and a long dull film", "fine"]
    with pytest.warns(UserWarning, match="full .tokens, vocabulary. logits"):
        result = tune_model(student, scaled, tokenizer, texts, TuneSettings(batch_size=3, max_steps=1))
    assert result["kl_logits"] == "full"


def test_tuning_with_the_chunked_kl_follows_the_full_logits_run(llama_last_layer, monkeypatch):
    """The same losses and trained weights, step by step, whether the KL comes from 3-token chunks or
    from the full logits (packed windows and padded rows, the replayed early layer, AdamW)."""
    import mlpfuse.train.tune as tune
    import mlpfuse.train.tune_kl as tune_kl

    original, fused, _ = llama_last_layer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    texts = ["good movie", "bad plot and a long dull film", "fine", "a bright and funny actor"] * 2
    settings = TuneSettings(batch_size=4, lr=3e-3, max_length=16, first_token_weight=0.5, kl_temperature=2.0)

    def run() -> tuple[dict, dict]:
        student, teacher = mlpfuse.load(fused, task="causal-lm"), mlpfuse.load(original, task="causal-lm")
        result = tune_model(student, teacher, tokenizer, texts, settings)
        return result, {n: p.detach().clone() for n, p in student.named_parameters() if "layers.1.mlp" in n}

    monkeypatch.setattr(tune_kl, "KL_CHUNK_ELEMENTS", 3 * len(tokenizer))
    chunked, chunked_weights = run()
    assert chunked["kl_logits"] == "chunks of 3 tokens"
    monkeypatch.setattr(tune, "kl_heads", lambda *args: None)
    with pytest.warns(UserWarning):
        full, full_weights = run()
    assert full["kl_logits"] == "full"
    assert chunked["losses"] == pytest.approx(full["losses"], rel=1e-5)
    for key, weight in full_weights.items():
        torch.testing.assert_close(chunked_weights[key], weight, rtol=1e-4, atol=1e-6, msg=key)
