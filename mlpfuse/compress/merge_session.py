"""``merge-layers``: the original model in memory, read and changed one MLP site at a time, with the
activations and the loss that choose and align the window."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mlpfuse.arch.activations import capture, token_rows
from mlpfuse.arch.io import SCALE_BUFFER, read_mlp, tensor_names, write_mlp
from mlpfuse.compress.mlp import MLPWeights
from mlpfuse.data import read_table
from mlpfuse.errors import InputError
from mlpfuse.runtime import encoder_decoder_inputs, load_tokenizer


class ModelSession:
    """The original model in memory: read/set one site's MLP, collect activations, compute the loss.

    ``tokenizer`` is needed only to read text (:meth:`batches`); None when no text is read.
    """

    def __init__(self, directory: Path, sites: list[MLPSite], causal: bool, max_length: int, batch_size: int,
                 tokenizer=None):
        from mlpfuse.checkpoints.modeling import load

        self.model = load(str(directory), task="causal-lm" if causal else "base").eval()
        self.base = self.model.base_model
        self.sites, self.causal = sites, causal
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        state = self.base.state_dict()
        self.keys = set(state)

    def batches(self, texts: list) -> list[dict]:
        """Padded batches of strings, or of (text, pair) tuples tokenised as pairs."""
        if self.tokenizer is None:
            raise RuntimeError("ModelSession reads text but was given no tokenizer")
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            pairs = (list(t) for t in zip(*chunk)) if chunk and isinstance(chunk[0], tuple) else (chunk,)
            enc = self.tokenizer(*pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    def _forward(self, batch: dict, model=None):
        model = model or self.model
        return model(**batch, **encoder_decoder_inputs(model, batch))  # decoder input: the text itself

    def read(self, site: MLPSite) -> MLPWeights:
        state = self.base.state_dict()
        mlp = read_mlp(site, tensor_names(site, "", self.keys), lambda k: state[k].detach().clone())
        scale_key = f"{site.module_path('down')}.{SCALE_BUFFER}"
        if scale_key in state:
            mlp.scale = state[scale_key].detach().clone()
        return mlp

    def write(self, site: MLPSite, mlp: MLPWeights) -> None:
        """Put ``mlp`` at ``site`` (same shapes); a folded MLP on a scaled module gets scale 1."""
        if mlp.scale is None and f"{site.module_path('down')}.{SCALE_BUFFER}" in self.keys:
            mlp = replace(mlp, scale=torch.ones(mlp.width))
        tensors = write_mlp(site, mlp, "", next(self.base.parameters()).dtype)
        result = self.base.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"merged tensors did not match the modules: {result.unexpected_keys}")

    @torch.no_grad()
    def activations(self, texts: list[str], sites: list[MLPSite], max_tokens: int) -> dict[int, dict[str, torch.Tensor]]:
        """Pre-activations (up and gate projection outputs) of ``sites`` on non-padding tokens."""
        store: dict[tuple[int, str], list] = {}
        tokens = 0
        with capture(self.base, sites, ("pre",)) as caught:
            for batch in self.batches(texts):
                caught.clear()
                mask = batch["attention_mask"].bool()
                self._forward(batch)
                for site in sites:
                    for role, part in caught.get(site.index, "pre").items():
                        store.setdefault((site.index, role), []).append(token_rows(part, mask).float())
                tokens += int(mask.sum())
                if tokens >= max_tokens:
                    break
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (index, role), chunks in store.items():
            out.setdefault(index, {})[role] = torch.cat(chunks)[:max_tokens]
        return out

    @torch.no_grad()
    def outputs(self, batches: list[dict]) -> list[torch.Tensor]:
        """Reference hidden states of the current model (for the encoder objective)."""
        return [self._hidden(self._forward(b)) for b in batches]

    @staticmethod
    def _hidden(out) -> torch.Tensor:
        parts = [out.last_hidden_state]
        if getattr(out, "encoder_last_hidden_state", None) is not None:
            parts.append(out.encoder_last_hidden_state)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def loss(self, batches: list[dict], reference: list[torch.Tensor] | None) -> float:
        """Perplexity (causal LMs) or masked hidden-state MSE against ``reference`` (others)."""
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            out = self._forward(batch)
            mask = batch["attention_mask"]
            if self.causal:
                logits = out.logits[:, :-1].float()
                labels = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
            else:
                hidden = self._hidden(out)
                full_mask = mask if hidden.shape[1] == mask.shape[1] else torch.cat([mask, mask], dim=1)
                diff = (hidden - reference[i]).float().pow(2).mean(-1)
                total += float((diff * full_mask).sum())
                count += int(full_mask.sum())
        mean = total / max(count, 1)
        return float(torch.tensor(mean).exp()) if self.causal else mean


def read_texts(path: str | None, column: str, limit: int, what: str, pair_column: str | None = None) -> list | None:
    """Non-empty texts (or text pairs) of column ``column`` of the first ``limit`` rows of ``path``;
    None without a path. Raises InputError when none is left (``what`` names the file's role)."""
    if path is None:
        return None
    texts = [t for t in read_table(path, limit=limit).texts(column, pair_column)
             if (t[0] if isinstance(t, tuple) else t).strip()]
    if not texts:
        raise InputError(f"{what} file {path} has no non-empty text in column {column!r}")
    return texts


def text_tokenizer(directory: Path, needed: bool):
    """The source's tokenizer when text is read (``--calibration``, ``--eval``), else None: weights and
    config suffice otherwise, as for fuse. Raises InputError when it is needed and missing."""
    return load_tokenizer(directory) if needed else None
