"""The logit KL of `tune`, computed chunk by chunk so that its memory does not grow with the vocabulary.

The teacher and the student run their base models to the last hidden state; each model's own
output head (:func:`output_head`: ``get_output_embeddings()`` plus the logit scaling or
softcapping its config asks for) then turns ``chunk`` tokens at a time into logits. Each chunk's
KL is gradient-checkpointed (``torch.utils.checkpoint``), so one chunk's [chunk, vocab] logits are
alive at a time, in the backward pass too (at the price of running both heads on each chunk once
more there). :func:`kl_heads` checks on a short probe that the heads reproduce each model's own
logits; where they do not (a head this module does not know), tune computes the full logits as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Tokens per chunk are chosen so one float32 [chunk, vocab] tensor holds about this many values
# (64 MiB): 64 tokens at a 262k vocabulary, 512 at 32k.
KL_CHUNK_ELEMENTS = 2 ** 24
PROBE_TOKENS = 16  # tokens of the first text on which kl_heads compares the heads with the full forward

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KLHeads:
    """The student's and the teacher's output heads and the tokens per chunk of :func:`chunked_logit_kl`."""

    student: Head
    teacher: Head
    chunk: int


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmax at temperature T per token: logits [..., vocab] -> [...] (float32)."""
    teacher_log = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)


def _scalings(config) -> list[Head] | None:
    """What transformers' causal-LM forwards do to the head's output, read from config fields (in
    the order they apply it): ``logit_scale`` multiplies (Cohere), ``logits_scaling`` divides
    (Granite), ``final_logit_softcapping`` caps as ``cap * tanh(z / cap)`` (Gemma 2/3). None when
    such a field holds something other than a number."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    steps: list[Head] = []
    for field, step in (("logit_scale", lambda value: lambda z: z * value),
                        ("logits_scaling", lambda value: lambda z: z / value),
                        ("final_logit_softcapping", lambda value: lambda z: torch.tanh(z / value) * value)):
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        steps.append(step(float(value)))
    return steps


def output_head(model: torch.nn.Module) -> Head | None:
    """hidden [tokens, hidden] -> logits [tokens, vocab] as ``model``'s forward computes them from its base
    model's last hidden state; None when the model has no output embeddings or an unreadable scaling."""
    projection = model.get_output_embeddings()
    steps = _scalings(model.config)
    if projection is None or steps is None:
        return None

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = projection(hidden)
        for step in steps:
            logits = step(logits)
        return logits

    return head


def last_hidden_state(model: torch.nn.Module, encoded: dict) -> torch.Tensor:
    """The base model's last hidden state [batch, seq, hidden]: what the output head reads."""
    return model.base_model(**encoded).last_hidden_state


def _reproduces(model: torch.nn.Module, head: Head, probe: dict) -> bool:
    """Whether ``head`` on the base model's last hidden state gives ``model``'s own logits on ``probe``."""
    with torch.no_grad():
        full = model(**probe).logits.float()
        mine = head(last_hidden_state(model, probe)).float()
    if mine.shape != full.shape:
        return False
    scale = max(1.0, float(full.abs().max()))
    return bool(torch.allclose(mine, full, rtol=1e-4, atol=1e-5 * scale))


def kl_heads(student: torch.nn.Module, teacher: torch.nn.Module, probe: dict) -> KLHeads | None:
    """Both models' output heads, checked on ``probe`` (an encoded batch; its first row's first
    PROBE_TOKENS tokens are used) against the models' full forwards; None when either does not
    reproduce its model's logits (the caller then computes the full logits)."""
    probe = {key: value[:1, :PROBE_TOKENS] for key, value in probe.items()}
    heads = output_head(student), output_head(teacher)
    if any(head is None for head in heads) or not all(
            _reproduces(model, head, probe) for model, head in zip((student, teacher), heads)):
        return None
    vocab = student.get_output_embeddings().weight.shape[0]
    return KLHeads(student=heads[0], teacher=heads[1], chunk=max(1, KL_CHUNK_ELEMENTS // vocab))


def _chunk_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, heads: KLHeads,
              temperature: float) -> torch.Tensor:
    """The summed per-token KL of one chunk: hidden states [chunk, hidden] each -> a scalar."""
    with torch.no_grad():
        teacher_logits = heads.teacher(teacher_hidden)
    return token_kl(heads.student(student_hidden), teacher_logits, temperature).sum()


def chunked_logit_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, heads: KLHeads, mask: torch.Tensor,
                     temperature: float = 1.0, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mlpfuse.train.tune.logit_kl` from the last hidden states [batch, seq, hidden] instead of the logits.

    The non-padding tokens (``mask`` [batch, seq]) go through the heads ``heads.chunk`` at a time;
    each chunk's KL is checkpointed, so its logits are freed after the forward and recomputed in
    the backward. Sum over tokens divided by ``tokens`` (default: their count), times T^2.
    """
    keep = mask.bool()
    student_rows, teacher_rows = student_hidden[keep], teacher_hidden[keep].detach()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_rows.shape[0], heads.chunk):
        rows = slice(start, start + heads.chunk)
        if student_rows.requires_grad:
            total = total + checkpoint(_chunk_kl, student_rows[rows], teacher_rows[rows], heads, temperature,
                                       use_reentrant=False)
        else:
            total = total + _chunk_kl(student_rows[rows], teacher_rows[rows], heads, temperature)
    count = keep.sum().to(total.dtype) if tokens is None else tokens.to(total.dtype)
    return total / count * temperature ** 2

