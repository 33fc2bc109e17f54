#!/usr/bin/env bash
# The GPU check of issue 19, in one go (<= 8 min on one H200), writing JSON to the folder given:
#   pytest_gpu.json   the tests marked gpu on --device (needs the project's dependencies:
#                     pydantic, flwr, ...; without them recorded as skipped, with the reason)
#   env.json, replay.json, table1.json, zo_step.json   benchmarks/gpu_check.py (torch,
#                     transformers and peft only; nothing downloaded)
#
#   benchmarks/gpu_check.sh OUT [--device cuda|cpu] [--tiny] [more gpu_check.py options]
#   benchmarks/gpu_check.sh benchmarks/results/gpu_check_cpu_dryrun --device cpu --tiny   # CPU dry run
#
# Written and dry-run on a CPU; not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT [--device cuda|cpu] [--tiny] ...}
shift
device=cuda
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --device ]] && device=${args[i + 1]}
done
PY=${PYTHON:-python}
[[ -x .venv/bin/python && -z ${PYTHON:-} ]] && PY=.venv/bin/python
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
start=$(date +%s)

# 1. the pytest subset marked gpu, when the project's dependencies import
if why=$($PY -c "import tests.helpers" 2>&1); then
  timeout 240 $PY -m pytest -q -p no:cacheprovider -n 0 -m gpu --device "$device" tests/test_devices.py \
    --junitxml "$out/pytest_gpu.xml" > "$out/pytest_gpu.log" 2>&1
  rc=$?
  $PY - "$out" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
suite = ET.parse(f"{out}/pytest_gpu.xml").getroot().find("testsuite") or ET.parse(f"{out}/pytest_gpu.xml").getroot()
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump({"exit_code": rc, **counts, "seconds": float(suite.get("time", 0))}, open(f"{out}/pytest_gpu.json", "w"), indent=2)
PY
else
  printf '{"skipped": true, "reason": %s}\n' "$($PY -c 'import json,sys; print(json.dumps(sys.argv[1][-500:]))' "$why")" \
    > "$out/pytest_gpu.json"
fi
echo "pytest_gpu: $(cat "$out/pytest_gpu.json" | tr -d '\n' | cut -c1-200)"

# 2. replay, Table I, ZO step / forward
timeout 420 $PY -m benchmarks.gpu_check "$out" "$@"
rc=$?
echo "gpu_check: exit $rc, $(($(date +%s) - start)) s in all"
exit $rc
