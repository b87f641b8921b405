"""The README's quick start and "The rest of the workflow" run top to bottom as written, on the bundled MiniLM.

bash reads the README's code blocks as a user's shell would (variables, line continuations, comments);
each ``mlpfuse`` command it reaches is recorded, then run in this process in the same order (one
import of torch and transformers, not one per command). Only data-size flags are added (``SMALLER``):
as written, ``tune`` and ``finetune`` train on all 67,349 SST-2 rows, hours on a CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from mlpfuse.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"

# Added to the README's command (the last value given for a flag wins); data sizes only.
SMALLER = {
    "ntk-check": ["--samples", "8", "--seeds", "1"],
    "tune": ["--limit", "16", "--max-steps", "2", "--batch-size", "8", "--eval-rows", "8"],
    "finetune": ["--limit-train", "16", "--limit-eval", "16", "--max-steps", "2", "--batch-size", "8"],
    "bench": ["--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "16"],
    "merge-layers": ["--calibration-limit", "16", "--eval-limit", "16", "--max-tokens", "256"],
}

# The install of the quick start is skipped: this test runs in the environment it made.
SHELL_PRELUDE = """
set -euo pipefail
python3() { :; }
pip() { :; }
mlpfuse() { "$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"; }
"""


def bash_block(section: str) -> str:
    """The first ```bash block under the README heading ``section``."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", body, flags=re.DOTALL).group(1)


def recorded_commands(work: Path) -> list[list[str]]:
    """The ``mlpfuse`` command lines of the quick start and the workflow, as bash expands them in ``work``."""
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text("")
    script = SHELL_PRELUDE + bash_block("Quick start") + bash_block("The rest of the workflow")
    calls = work / "calls.jsonl"
    result = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "CALLS": str(calls)})
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


@pytest.mark.slow
def test_readme_workflow_runs_as_written(tmp_path, monkeypatch):
    if not (SHARED / "data" / "sst2" / "train.tsv").is_file():
        pytest.skip("SST-2 data not present")
    work = tmp_path / "repo"  # the README's commands run from the repository root: ../shared is the data
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    commands = recorded_commands(work)
    assert [c[0] for c in commands] == ["fuse", "ntk-check", "tune", "finetune", "finetune", "finetune", "export",
                                        "bench", "bench", "merge-layers", "export", "inspect"]
    monkeypatch.chdir(work)
    run_in_order(commands)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained("sst2-plain")  # "loads it anywhere"
    assert type(plain).__name__ == "BertForSequenceClassification"
    lora = transformers.AutoModelForSequenceClassification.from_pretrained("sst2-lora-plain")  # fuse -> LoRA -> export
    assert type(lora).__name__ == "BertForSequenceClassification"
    assert json.loads((work / "sst2-lora" / "mlpfuse_finetune.json").read_text())["lora"]["merged"] is True
    assert json.loads((work / "metrics.json").read_text())["metrics"]["accuracy"] >= 0


def run_in_order(commands: list[list[str]]) -> None:
    """Each command in this process, with ``SMALLER``'s flags; the GPU line without a GPU must say so (exit 3)."""
    for command in commands:
        result = CliRunner().invoke(app, [*command, *SMALLER.get(command[0], [])])
        if "cuda" in command and not torch.cuda.is_available():  # the GPU line: refused as documented
            assert result.exit_code == 3 and "GPU" in result.output, result.output
            continue
        assert result.exit_code == 0, (command, result.output[-3000:])
