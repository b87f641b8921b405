"""Instruction data for `finetune --task causal-lm`: formats, loss masking, truncation, packing, perplexity."""

from __future__ import annotations

import json
import math

import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mlpfuse.data import read_table
from mlpfuse.errors import InputError
from mlpfuse.train.finetune import FinetuneSettings
from mlpfuse.train.instruct import (IGNORE, MESSAGES, PAIRS, TEXT, data_format, encode_conversation, encode_instructions,
                              pack, response_perplexity)

from .conftest import tiny_config

# A ChatML-like template (as SmolLM2's, without the default system prompt)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine, thanks"}, {"role": "user", "content": "and the answer?"},
                {"role": "assistant", "content": "forty two"}]


def byte_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer (decoding gives the text back exactly) with ChatML special tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["how are you fine thanks", "the answer is forty two", "be brief"] * 4, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def runs(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they carry a label."""
    groups: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        answer = label != IGNORE
        if answer:
            assert label == token  # an answer token's label is the token itself (the model shifts)
        if groups and groups[-1][1] == answer:
            groups[-1][0].append(token)
        else:
            groups.append(([token], answer))
    return groups


def test_chat_template_labels_only_the_assistant_turns_of_the_rendering():
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    ids, labels = encode_conversation(tokenizer, CONVERSATION, max_length=1000)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    groups = runs(ids, labels)
    assert "".join(tokenizer.decode(g) for g, _ in groups) == rendered  # every token, in order, is the rendering
    answers = [tokenizer.decode(g) for g, answer in groups if answer]
    assert answers == ["fine, thanks<|im_end|>\n", "forty two<|im_end|>\n"]  # the assistant turns, end of turn included
    prompts = [tokenizer.decode(g) for g, answer in groups if not answer]
    assert prompts == ["<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhow are you<|im_end|>\n"
                       "<|im_start|>assistant\n",
                       "<|im_start|>user\nand the answer?<|im_end|>\n<|im_start|>assistant\n"]


def test_messages_after_the_last_answer_are_dropped():
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    ids, labels = encode_conversation(tokenizer, CONVERSATION + [{"role": "user", "content": "bye"}], 1000)
    assert (ids, labels) == encode_conversation(tokenizer, CONVERSATION, 1000)


def test_without_a_template_the_plain_format_is_prompt_newline_response_eos():
    tokenizer = byte_tokenizer()
    ids, labels = encode_conversation(tokenizer, [{"role": "user", "content": "how are you"},
                                                  {"role": "assistant", "content": "fine"}], max_length=1000)
    groups = runs(ids, labels)
    assert [answer for _, answer in groups] == [False, True]
    assert tokenizer.decode(groups[0][0]) == "how are you\n"  # this tokenizer adds no BOS
    assert groups[1][0][-1] == tokenizer.eos_token_id and tokenizer.decode(groups[1][0]) == "fine</s>"


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_both_jsonl_formats_give_the_same_rows_and_plain_text_stays_text(tmp_path):
    pairs = [{"prompt": "how are you", "response": "fine"}, {"prompt": "the answer", "response": "forty two"}]
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
                for r in pairs]
    settings = FinetuneSettings(task="causal-lm", max_length=64)
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    first = read_table(str(write_jsonl(tmp_path / "pairs.jsonl", pairs)))
    second = read_table(str(write_jsonl(tmp_path / "chat.jsonl", messages)))
    text = read_table(str(write_jsonl(tmp_path / "text.jsonl", [{"sentence": "how are you"}])))
    assert (data_format(first, settings), data_format(second, settings), data_format(text, settings)) == (PAIRS, MESSAGES, TEXT)
    assert encode_instructions(first, tokenizer, settings).features == encode_instructions(second, tokenizer, settings).features
    renamed = read_table(str(write_jsonl(tmp_path / "q.jsonl", [{"q": "how are you", "a": "fine"}])))
    custom = FinetuneSettings(task="causal-lm", prompt_column="q", response_column="a", max_length=64)
    assert encode_instructions(renamed, tokenizer, custom).features[0] == encode_instructions(first, tokenizer, settings).features[0]


def test_truncation_and_packing(tmp_path):
    tokenizer = byte_tokenizer()
    rows = [{"prompt": "how are you " * 3, "response": "fine"}, {"prompt": "be", "response": "forty two"},
            {"prompt": "the", "response": "answer"}]
    table = read_table(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    full = encode_instructions(table, tokenizer, FinetuneSettings(task="causal-lm", max_length=1000))
    first = full.features[0]
    short = len(first["input_ids"]) - sum(label != IGNORE for label in first["labels"])  # cuts the first row's answer
    cut = encode_instructions(table, tokenizer, FinetuneSettings(task="causal-lm", max_length=short))
    assert cut.dropped == 1 and len(cut) == 2
    assert all(len(f["input_ids"]) <= short for f in cut.features)
    for feature in cut.features:
        assert feature["labels"] == next(f["labels"] for f in full.features if f["input_ids"] == feature["input_ids"])
    lengths = [len(f["input_ids"]) for f in full.features]
    budget = lengths[1] + lengths[2]
    packed = encode_instructions(table, tokenizer, FinetuneSettings(task="causal-lm", max_length=max(budget, lengths[0]),
                                                                    packing=True))
    assert [len(f["input_ids"]) for f in packed.features] == [lengths[0], budget]
    assert packed.features[1]["labels"] == full.features[1]["labels"] + full.features[2]["labels"]
    assert pack([([1, 2], [IGNORE, 2]), ([3], [3]), ([4, 5, 6], [IGNORE, 5, 6])], 3) == [
        ([1, 2, 3], [IGNORE, 2, 3]), ([4, 5, 6], [IGNORE, 5, 6])]


def test_response_perplexity_counts_only_answer_tokens(tmp_path):
    tokenizer = byte_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tokenizer))).eval()
    rows = [{"prompt": "how are you", "response": "fine, thanks"}, {"prompt": "the answer?", "response": "forty two"}]
    table = read_table(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    settings = FinetuneSettings(task="causal-lm", max_length=64)
    result = response_perplexity(model, tokenizer, table, settings)
    total, count = 0.0, 0
    with torch.no_grad():  # one row at a time, no padding, from the rendering's two halves
        for row in rows:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                                  {"role": "assistant", "content": row["response"]}], tokenize=False)
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head + answer])
            log_probs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            picked = log_probs.gather(-1, targets[:, None])[:, 0][len(head) - 1:]
            total -= float(picked.sum())
            count += len(answer)
    assert result["response_tokens"] == count and result["eval_rows"] == 2
    assert result["response_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a"}], "no 'response' column"),
    ([{"other": "a"}], "no column 'sentence'"),
    ([{"messages": "hello"}], "not a non-empty list"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
    ([{"messages": [{"role": "user"}]}], "string 'role' and 'content'"),
])
def test_bad_instruction_rows_are_one_line_errors(tmp_path, rows, expected):
    table = read_table(str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    with pytest.raises(InputError, match=expected):
        encode_instructions(table, byte_tokenizer(CHAT_TEMPLATE), FinetuneSettings(task="causal-lm"))
