"""Check an mlpfuse ``--json`` report against thresholds; for CI pipelines that produce checkpoints.

    python examples/ci/check_report.py fuse-report.json --min-saved 0.15 --max-inertia 5e4
    python examples/ci/check_report.py finetune-metrics.json --max-perplexity 30

Checks (each only when its flag is given):
  --min-saved F       fraction of parameters saved, (before - after) / before, at least F
  --max-inertia X     k-means inertia of every fused layer (and MoE expert) at most X
  --max-perplexity X  the report's perplexity at most X (a report without one is an error)
Exit codes: 0 every check passed, 1 a threshold failed, 2 the report is unreadable or lacks a value.
Only the standard library is used, so the check runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys


def _inertias(report: dict) -> list[tuple[str, float]]:
    values = []
    for layer in report.get("layers", []):
        if layer.get("inertia") is not None:
            values.append((f"layer {layer.get('label')}", float(layer["inertia"])))
        for expert in layer.get("experts") or []:
            if expert.get("inertia") is not None:
                values.append((f"layer {layer.get('label')} expert {expert.get('expert')}", float(expert["inertia"])))
    return values


def _perplexity(report: dict) -> float | None:
    for holder in (report, report.get("metrics") or {}, report.get("eval") or {}):
        if isinstance(holder, dict) and holder.get("perplexity") is not None:
            return float(holder["perplexity"])
    return None


def check(report: dict, min_saved: float | None, max_inertia: float | None, max_perplexity: float | None) -> list[str]:
    """Lines ``PASS ...`` / ``FAIL ...`` for each threshold given; ValueError when a value is missing."""
    lines = []
    if min_saved is not None:
        params = report.get("parameters") or {}
        if not params.get("before"):
            raise ValueError("the report has no parameters.before/after (is it a fuse report?)")
        saved = (params["before"] - params["after"]) / params["before"]
        lines.append(f"{'PASS' if saved >= min_saved else 'FAIL'} parameters saved {saved:.3f} (min {min_saved})")
    if max_inertia is not None:
        inertias = _inertias(report)
        if not inertias:
            raise ValueError("the report has no k-means inertia (a method without k-means?)")
        name, worst = max(inertias, key=lambda item: item[1])
        lines.append(f"{'PASS' if worst <= max_inertia else 'FAIL'} largest inertia {worst:.4g} at {name} (max {max_inertia})")
    if max_perplexity is not None:
        value = _perplexity(report)
        if value is None:
            raise ValueError("the report has no perplexity (evaluate a causal LM, e.g. mlpfuse finetune --json)")
        lines.append(f"{'PASS' if value <= max_perplexity else 'FAIL'} perplexity {value:.4g} (max {max_perplexity})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an mlpfuse --json report against thresholds.")
    parser.add_argument("report")
    parser.add_argument("--min-saved", type=float)
    parser.add_argument("--max-inertia", type=float)
    parser.add_argument("--max-perplexity", type=float)
    args = parser.parse_args(argv)
    try:
        with open(args.report, encoding="utf-8") as handle:
            report = json.load(handle)
        if not isinstance(report, dict):
            raise ValueError("the report is not a JSON object")
        lines = check(report, args.min_saved, args.max_inertia, args.max_perplexity)
    except (OSError, ValueError) as exc:
        print(f"error: {args.report}: {exc}", file=sys.stderr)
        return 2
    if not lines:
        print("error: no threshold given (--min-saved, --max-inertia, --max-perplexity)", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
