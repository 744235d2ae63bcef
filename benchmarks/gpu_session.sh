#!/usr/bin/env bash
# One GPU-machine session: GPU tests, the example and the benchmarks, all results under $OUT.
# Run from the repo root on the device machine (carry .whl with the wheels it lacks: FlashInfer, hypothesis).
set -uo pipefail
OUT=${OUT:-/tmp/nanoflow_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import datetime, torch, transformers, triton
print("date", datetime.date.today(), "| device", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
PY
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
}
for step in ${STEPS:-tests example}; do
  case $step in
    tests) run pytest_cuda python3 -m pytest -m cuda -q -p no:cacheprovider ;;
    example) run example python3 examples/generate.py --device cuda --batch-size 64 --prompt-len 128 --max-new-tokens 64 ;;
    *) run "$step" python3 "$step" ;;
  esac
done
