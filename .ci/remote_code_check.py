"""CI: the remote code shipped in fused checkpoints loads in another transformers release.

    python .ci/remote_code_check.py make DIR    # with mlpfuse installed: tiny fused checkpoints + reference logits
    python .ci/remote_code_check.py check DIR   # in a venv with only torch + transformers (e.g. 4.57)

``check`` loads each checkpoint with ``trust_remote_code=True`` (mlpfuse is not importable there),
compares its logits with the reference and exits non-zero on any failure. MoE checkpoints use the
stacked expert modules of transformers 5 and are not part of the 4.x check (docs/deploy.md).
"""

import json
import sys
from pathlib import Path

FAMILIES = ("llama", "gpt2", "bert", "t5-gated")
AUTO = {"masked-lm": "AutoModelForMaskedLM", "sequence-classification": "AutoModelForSequenceClassification",
        "causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM"}


def make(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import mlpfuse
    from mlpfuse.compress.fuse import FuseSettings, fuse_checkpoint
    from tests.conftest import build_tiny, model_inputs, outputs_of

    jobs = []
    for name in FAMILIES:
        model, task = build_tiny(name)
        model.save_pretrained(root / f"{name}-src")
        fuse_checkpoint(str(root / f"{name}-src"), root / name, FuseSettings(ratio=0.5, backend="torch"))
        inputs = model_inputs(name)
        torch.save({"inputs": inputs, "logits": outputs_of(mlpfuse.load(root / name, task=task).eval(), inputs)},
                   root / f"{name}.pt")
        jobs.append([name, AUTO[task]])
    (root / "jobs.json").write_text(json.dumps(jobs))


def check(root: Path) -> int:
    import torch
    import transformers

    assert "mlpfuse" not in sys.modules
    failures = 0
    for name, auto in json.loads((root / "jobs.json").read_text()):
        data = torch.load(root / f"{name}.pt")
        try:
            model = getattr(transformers, auto).from_pretrained(str(root / name), trust_remote_code=True).eval()
            with torch.no_grad():
                diff = (model(**data["inputs"]).logits - data["logits"]).abs().max().item()
            ok = diff < 1e-4
        except Exception as exc:  # noqa: BLE001 - report every family, then fail
            diff, ok = f"{type(exc).__name__}: {exc}", False
        failures += not ok
        print(f"transformers {transformers.__version__}: {name} {'ok' if ok else 'FAILED'} (max |diff| {diff})")
    return 1 if failures else 0


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "make":
        make(directory)
    else:
        sys.exit(check(directory))
