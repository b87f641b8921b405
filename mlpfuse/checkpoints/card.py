"""The model cards (README.md) written into derived checkpoints (mlpfuse/checkpoints/writer.py writes them)."""

from __future__ import annotations


_LOADING = """## Loading

```python
import mlpfuse
model = mlpfuse.load("path/to/this/dir", task="sequence-classification", num_labels=2)
```

or, with only transformers installed:

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("path/to/this/dir", trust_remote_code=True)
```

The returned model is the standard transformers class of the base architecture with narrower MLP
projections; submodule names are unchanged, so PEFT/LoRA target names still apply.
"""


def model_card(report: dict) -> str:
    """Markdown that says what was fused, how, and what it saved."""
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    saved = 100.0 * (before - after) / before if before else 0.0
    rows = "\n".join(
        f"| {layer['label']} | {layer['original_width']} | {layer['width']} | {'-' if layer['inertia'] is None else format(layer['inertia'], '.4g')} |"
        for layer in report["layers"]
    )
    return f"""---
library_name: transformers
tags:
- mlpfuse
- mlp-fusion
---

# {report['source_name']} with fused MLPs

This checkpoint was written by [mlpfuse](https://pypi.org/project/mlpfuse/) {report['version']}
from `{report['source']}` with method `{report['method']}` (seed {report['seed']}, k-means backend
`{report['backend']}`).

Method `fusion` is MLP Fusion (Wei et al., ICML 2023): the sub-MLPs (neurons) of each chosen
feed-forward block are clustered with k-means, each cluster is replaced by its average, and the
cluster sizes are kept as a constant scale `P` (buffer `fusion_scale`) so the fine-tuning dynamics
(the Adam NTK) stay close to the original. Method `cluster` folds `sqrt(P)` into the weights instead.

Parameters: {before:,} before, {after:,} after ({saved:.1f}% fewer).

| layer | width before | width after | k-means inertia |
|---|---|---|---|
{rows}

{_LOADING}"""


def derived_card(source: str, version: str, summary: str) -> str:
    """Markdown for a checkpoint derived from an mlpfuse checkpoint (merge-layers, tune): what was
    done (``summary``, one sentence) to which source, and how to load it."""
    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    return f"""---
library_name: transformers
tags:
- mlpfuse
---

# {name}: {summary}

This checkpoint was written by [mlpfuse](https://pypi.org/project/mlpfuse/) {version} from `{source}`:
{summary}. Its `config.json` records how (the `mlpfuse` section).

{_LOADING}"""
