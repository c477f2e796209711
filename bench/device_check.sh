#!/usr/bin/env bash
# Verifies all GPU code of the project in one call on a GPU machine: builds the package with CUDA
# for sm_90, runs the GPU tests (marked cuda, plus the Triton tests on the GPU), compute-sanitizer
# (memcheck, racecheck) over a small case of every GPU kernel, and the benchmarks. Writes one log per
# step and summary.json (build_info, test counts, sanitizer errors, benchmark results) to the output
# folder: the argument, else $OUT, else ./device_check. About 9 minutes on an H100.
#
#   bash bench/device_check.sh [--quick] [OUT_DIR]
#
# --quick (about 4 minutes) leaves out the Triton shape grid, racecheck, the large benchmark shapes
# and the decoding and training-throughput benchmarks. Optional peers are benchmarked when installed (pip install
# cut-cross-entropy). Every step runs even if an earlier one failed; the exit status is that of the
# first failed step.
set -uo pipefail
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-${OUT:-device_check}}" && cd "${1:-${OUT:-device_check}}" && pwd)
work=$(mktemp -d)
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: runs it with its output in OUT/NAME.log, records rc and seconds
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$work/steps.jsonl"
  tail -n 4 "$out/$name.log"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

tests=(-m "cuda or triton" tests/)
sanitizers=(memcheck racecheck)
kernel_shapes=()
if [ $quick -eq 1 ]; then
  tests+=(-k "not (test_shape_grid and triton)")
  sanitizers=(memcheck)
  kernel_shapes=(--shapes 512x6x16x512 4096x2x4096x512)
fi
python -c "import xdist" 2>/dev/null && tests+=(-n 12)

# Time limits per step keep a stuck step from taking the whole call.
step build timeout 240 python -m pip install --no-build-isolation --no-deps -v -e .
step tests timeout 300 python -m pytest -q -rfE "${tests[@]}"
for tool in "${sanitizers[@]}"; do
  step "$tool" timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
    python -m pytest -q -x -m cuda tests/test_cuda_code_ce.py tests/test_cuda_beam_search.py -k sanitizer_cases
done
step kernels timeout 240 python bench/kernels.py "${kernel_shapes[@]}" --profile --json "$work/kernels.json"
step scale_ids timeout 240 python bench/scale_ids.py --ids 10M --out "$work"
[ $quick -eq 0 ] && step decode timeout 240 python bench/decode.py --device cuda --tries 1Mx16x5 10Mx16x6 --repeats 2
# The trainer on the GPU (bf16, CUDA code head, identification through the GPU beam search), then
# training throughput of IResNet-50 with each head at 1M and 10M identities.
step train timeout 180 python -m gif_kernels.train --data synthetic --ids 1000 --images-per-id 16 \
  --backbone iresnet18 --batch-size 256 --steps 60 --workers 8 --out "$work/train"
[ $quick -eq 0 ] && step train_throughput timeout 300 python bench/train_throughput.py --json "$work/train_throughput.json"

python - "$work" "$out" <<'PY'
import json, re, sys
work, out = sys.argv[1:]
summary = {"steps": [json.loads(line) for line in open(f"{work}/steps.jsonl")]}
try:
    import gif_kernels, torch
    summary["build_info"] = gif_kernels.build_info()
    summary["device"] = torch.cuda.get_device_name()
except Exception as error:  # the build failed: say so in the summary
    summary["build_info"] = f"unavailable: {error}"
lines = open(f"{out}/tests.log").read().splitlines()
summary["tests"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", lines[-1] if lines else "")}
for tool in ("memcheck", "racecheck"):
    try:
        log = open(f"{out}/{tool}.log").read()
    except OSError:
        continue
    found = re.search(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", log)
    summary[f"{tool}_errors"] = int(found.group(1) or found.group(2)) if found else None
for bench, path in (("kernels", "kernels.json"), ("scale_ids", "scale_ids.json"),
                   ("train", "train/metrics.json"), ("train_throughput", "train_throughput.json")):
    try:
        summary[bench] = json.load(open(f"{work}/{path}"))
    except (OSError, ValueError):
        summary[bench] = None
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k not in ("kernels", "scale_ids")}, indent=1))
PY
rm -rf "$work"
exit $status
