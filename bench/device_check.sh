#!/usr/bin/env bash
# Verifies all GPU code of the project in one call on a GPU machine: builds the package with CUDA
# for sm_90, prints build_info(), runs the GPU tests (marked cuda, plus the Triton tests on the GPU),
# runs compute-sanitizer (memcheck, racecheck) over a small case of every GPU kernel, then the
# benchmarks.
# Writes logs and summary.json to the output folder (first argument, else $OUT, else ./device_check).
#
#   bash bench/device_check.sh [OUT_DIR]
#
# Optional peers are benchmarked when installed (pip install cut-cross-entropy). Every step runs
# even if an earlier one failed; the exit status is that of the first failed step.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-${OUT:-device_check}}" && cd "${1:-${OUT:-device_check}}" && pwd)
steps=$(mktemp)
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: runs it with its output in OUT/NAME.log, records rc and seconds
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$steps"
  tail -n 4 "$out/$name.log"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n 8)

# Time limits per step keep the whole check within 8 minutes on an H100.
step build timeout 240 python -m pip install --no-build-isolation --no-deps -v -e .
step tests timeout 240 python -m pytest -q -rfE "${parallel[@]}" -m "cuda or triton" tests/
for tool in memcheck racecheck; do
  step "$tool" timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
    python -m pytest -q -x -m cuda tests/test_cuda_code_ce.py -k sanitizer_cases
done
step kernels timeout 180 python bench/kernels.py --json "$out/kernels.json"

python - "$steps" "$out" <<'PY'
import json, re, sys
steps_file, out = sys.argv[1:]
steps = [json.loads(line) for line in open(steps_file)]
summary = {"steps": steps}
try:
    import gif_kernels, torch
    summary["build_info"] = gif_kernels.build_info()
    summary["device"] = torch.cuda.get_device_name()
except Exception as error:  # the build failed: say so in the summary
    summary["build_info"] = f"unavailable: {error}"
tests = open(f"{out}/tests.log").read()
summary["tests"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tests.splitlines()[-1] if tests else "")}
for tool in ("memcheck", "racecheck"):
    log = open(f"{out}/{tool}.log").read()
    found = re.search(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", log)
    summary[f"{tool}_errors"] = int(found.group(1) or found.group(2)) if found else None
try:
    summary["kernels"] = json.load(open(f"{out}/kernels.json"))["results"]
except (OSError, ValueError, KeyError):
    summary["kernels"] = None
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "kernels"}, indent=1))
PY
rm -f "$steps"
exit $status
