#!/usr/bin/env bash
# One GPU-machine session: GPU tests, profiles and benchmarks, all results under $OUT. Benchmarks run as modules
# (python3 -m benchmarks.x, python3 -m benchmarks.research.x: they import benchmarks.common).
# Run from the repo root on the device machine. Carry .whl (wheels it lacks: FlashInfer, hypothesis, ...) and,
# if you have it, .ficache/ficache.tgz (FlashInfer's JIT-built kernels from an earlier session: saves minutes).
#   STEPS="bench256 profile256 bench1_64 tests" bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/nanoflow_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then  # installed once per machine (a reinstall dates FlashInfer's sources anew:
  # its JIT modules would all be rebuilt)
  [ -d /tmp/site/flashinfer ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
  [ -d /tmp/site ] && export PYTHONPATH=$PWD:/tmp/site
fi
# FlashInfer >= 0.5 (fp8_attention's XQA) as wheels in .whl5 (flashinfer-python, apache-tvm-ffi): installed apart,
# in /tmp/site5; the xqa_* steps run on it, every other step on .whl's
if ls .whl5/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site5/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site5 .whl5/*.whl
fi
FI5=$PWD:/tmp/site5
if ls .ficache/ficache.tgz.part* >/dev/null 2>&1; then
  mkdir -p ~/.cache && cat .ficache/ficache.tgz.part* | tar xzf - -C ~/.cache
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import datetime, torch, transformers, triton
print("date", datetime.date.today(), "| device", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)
PY
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep going on failure or timeout (SIGINT first: pytest
  # then still prints its summary and durations)
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 30
}
B="-m benchmarks.bench_generate"
NF_CONFIG=${NF_CONFIG:-'{}'}  # NanoFlowConfig fields (JSON) for bench_offline
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-4}")  # tiny-model tests: compile-bound
for step in ${STEPS:-tests example}; do
  case $step in
    tests) run pytest_cuda ${TESTS_S:-560} python3 -m pytest -m cuda -q -p no:cacheprovider -rA --durations=25 $XDIST ;;
    tests_new) run pytest_new ${TESTS_NEW_S:-400} python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=25 $XDIST tests/test_gpu_backends.py tests/test_streams.py ;;
    example) run example 200 python3 examples/generate.py --device cuda --batch-size 64 --prompt-len 128 --max-new-tokens 64 ;;
    bench1_64) run bench1_64 420 python3 $B --batch-sizes 1 64 --backends triton flashinfer --out "$OUT/bench1_64.json" ;;
    fused) run fused 480 python3 $B --batch-sizes 64 256 --cases --backends flashinfer --inductor off on --out "$OUT/fused.json" ;;
    nanobatch) run nanobatch 420 python3 $B --batch-sizes 64 256 --cases --backends triton --nanobatches 1 2 --partitions streams soft hard --out "$OUT/nanobatch.json" ;;
    bench256) run bench256 420 python3 $B --batch-sizes 256 --backends triton flashinfer --out "$OUT/bench256.json" ;;
    profile64) run profile64 150 python3 -m benchmarks.profile_decode --batch-size 64 --context 1024 --out "$OUT/profile64.json" ;;
    profile256) run profile256 150 python3 -m benchmarks.profile_decode --batch-size 256 --context 1024 --out "$OUT/profile256.json" ;;
    profile64x) run profile64x 200 python3 -m benchmarks.profile_decode --batch-size 64 --context 1024 --backends flashinfer --inductor on --fuse-linears on off --kernels --out "$OUT/profile64x.json" ;;
    profile256x) run profile256x 200 python3 -m benchmarks.profile_decode --batch-size 256 --context 1024 --backends flashinfer --inductor on off --out "$OUT/profile256x.json" ;;
    profile_fused) run profile_fused ${PROFILE_S:-240} python3 -m benchmarks.profile_decode --batch-size ${PROFILE_B:-64} --context 1024 --backends flashinfer --inductor off on --kernels --out "$OUT/profile_fused.json" ;;
    bench64) run bench64 ${BENCH_S:-420} python3 $B --batch-sizes 64 --backends flashinfer triton --inductor on --nanobatches 1 2 --out "$OUT/bench64.json" ;;
    bench256x) run bench256x ${BENCH_S:-420} python3 $B --batch-sizes 256 --backends flashinfer triton --inductor on --nanobatches 1 2 --out "$OUT/bench256x.json" ;;
    tests_fp8) # the FP8 CUDA tests (GEMM, linears in the engine, FP8 KV on every backend and CUDA-graph bucket), the
      # TP search on a world of one; -rA names every test (xdist prints dots)
      run pytest_fp8 ${TESTS_S:-300} python3 -m pytest -m cuda -q -p no:cacheprovider -rA $XDIST tests/test_fp8_linear.py \
        tests/test_fp8_kv.py tests/test_fp8_checkpoints.py tests/test_gpu_backends.py \
        tests/test_tensor_parallel_fake.py::test_world_of_one_on_nccl_searches_schedules -k "fp8 or searches_schedules" ;;
    tests_streams) run pytest_streams ${TESTS_S:-300} python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=25 $XDIST tests/test_streams.py tests/test_gpu_runtime.py tests/test_triton_attention.py ;;
    bench256y) run bench256y ${BENCH_S:-420} python3 $B --batch-sizes 256 --backends flashinfer triton --inductor on --out "$OUT/bench256y.json" ;;
    ttft64) export FLASHINFER_JIT_VERBOSE=1  # its log shows whether ninja rebuilds anything
      run ttft64 ${BENCH_S:-200} python3 $B --batch-sizes 64 --cases --backends flashinfer --inductor on --out "$OUT/ttft64.json"
      unset FLASHINFER_JIT_VERBOSE ;;
    savecache) tar czf - -C ~/.cache flashinfer | split -b 15m - "$OUT/ficache.tgz.part" && ls -la "$OUT" ;;
    profile_engine) run profile_engine ${PROFILE_S:-240} python3 -m benchmarks.profile_engine --config "$NF_CONFIG" --out "$OUT/profile_engine.txt" ;;
    selected) run selected ${SELECTED_S:-300} python3 -m pytest -m cuda -q -p no:cacheprovider -rfE $XDIST -k "$TESTS_K" ;;
    smoke) run smoke ${SMOKE_S:-240} python3 -m pytest -m cuda -q -x -p no:cacheprovider -rfE tests/test_gpu_backends.py -k "flashinfer and (llama or gemma2)" ;;
    offline) run ${OFFLINE_NAME:-offline} ${OFFLINE_S:-540} python3 -m benchmarks.bench_offline --workloads ${WORKLOADS:-1024x512 512x512 chat} --requests ${REQUESTS:-256} --hf-requests ${HF_REQUESTS:-0} --hf-workloads ${HF_WORKLOADS:-1024x512} --config "$NF_CONFIG" ${OFFLINE_ARGS:-} --out "$OUT/${OFFLINE_NAME:-offline}.json" ;;
    overlap) run overlap ${OVERLAP_S:-420} python3 -m benchmarks.research.bench_overlap --reps ${REPS:-8} ${OVERLAP_ARGS:-} --out "$OUT/overlap.json" --trace "$OUT/balanced_trace.json" ;;
    tests_overlap) run pytest_overlap ${TESTS_S:-240} python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=10 $XDIST tests/test_gpu_overlap.py tests/test_streams.py ;;
    buckets) run buckets ${BUCKETS_S:-240} python3 -m benchmarks.bench_buckets --out "$OUT/buckets.json" ;;
    attn_sms) run attn_sms ${ATTN_S:-300} python3 -m benchmarks.research.bench_attention_sms ${ATTN_ARGS:-} --out "$OUT/attention_sms.json" ;;
    auto) run auto ${AUTO_S:-400} python3 -m benchmarks.research.bench_auto --config "$NF_CONFIG" --out "$OUT/auto.json" ;;
    corun) run corun ${CORUN_S:-150} python3 -m benchmarks.research.probe_corun ${CORUN_ARGS:-} --out "$OUT/corun.json" ;;
    ttft) run ttft ${TTFT_S:-200} python3 -m benchmarks.first_token --out "$OUT/ttft.json" ;;
    prefix) run bench_prefix ${PREFIX_S:-300} python3 -m benchmarks.bench_prefix ${PREFIX_ARGS:-} --out "$OUT/bench_prefix.json" ;;
    fp8_noise) run fp8_noise ${NOISE_S:-260} python3 -m benchmarks.research.probe_fp8_noise --out "$OUT/fp8_noise.json" ;;
    fp8_engine) # bf16, FP8 KV, FP8 KV + FP8 linears: the engine on 1024/512, one process each, same machine
      for pair in 'bf16|{}' 'fp8_kv|{"kv_cache_dtype": "fp8_e4m3"}' \
                  'fp8_both|{"kv_cache_dtype": "fp8_e4m3", "linear_dtype": "fp8_e4m3"}'; do
        run "offline_${pair%%|*}" ${OFFLINE_S:-130} python3 -m benchmarks.bench_offline --workloads 1024x512 \
          --requests ${REQUESTS:-256} --no-static --config "${pair#*|}" --out "$OUT/offline_${pair%%|*}.json"
      done ;;
    prefix_offload) # more conversations than the device cache holds: evicted histories come back from host memory
      run bench_prefix_offload ${PREFIX_S:-300} python3 -m benchmarks.bench_prefix --workloads rounds \
        --conversations 128 --rounds 4 --config '{"num_pages": 4096}' --offload-gib 16 \
        --out "$OUT/bench_prefix_offload.json" ;;
    fp8_accuracy) # the 8B shape's teacher-forced logits: FP8 KV, bf16 against fp32, FP8 linears, both (vs bf16)
      run fp8_accuracy ${ACC_S:-300} python3 -m benchmarks.bench_fp8_linear --skip gemms --out "$OUT/fp8_accuracy.json" ;;
    kv_dtype) run kv_dtype ${KV_S:-200} python3 -m benchmarks.bench_kv_dtype ${KV_ARGS:-} --out "$OUT/kv_dtype.json" ;;
    step_kernels) # where the FP8 steps' GPU time goes against bf16's: kernels by class, one process per config
      # (KERNEL_CONFIGS: a subset of the names)
      for pair in 'bf16|{}' 'fp8_kv|{"kv_cache_dtype": "fp8_e4m3"}' \
                  'fp8_both|{"kv_cache_dtype": "fp8_e4m3", "linear_dtype": "fp8_e4m3"}' \
                  'fp8_kv_triton|{"kv_cache_dtype": "fp8_e4m3", "attention_backend": "triton"}'; do
        [[ " ${KERNEL_CONFIGS:-bf16 fp8_kv fp8_both fp8_kv_triton} " == *" ${pair%%|*} "* ]] || continue
        run "step_kernels_${pair%%|*}" ${KERNELS_S:-150} python3 -m benchmarks.research.probe_step_kernels \
          --config "${pair#*|}" --out "$OUT/step_kernels_${pair%%|*}.json"
      done ;;
    serve) run bench_serve ${SERVE_S:-300} python3 -m benchmarks.bench_serve ${SERVE_ARGS:-} --out "$OUT/bench_serve.json" ;;
    seventy) # the 70B shape, all 80 layers, FP8 linears made directly, FP8 KV. On an H100 80GB the weights leave ~7
      # GiB: kv_cache_memory_fraction 0.96 and expandable segments (no free blocks kept in used segments) give the
      # cache the most (LAYERS70: fewer layers); on an H200 the cache takes ~65 GiB. Triton attention: FlashInfer
      # 0.3.1's decode plan died (segfault) capturing graphs for e4m3 at group size 8.
      # XQA70=1: FlashInfer >= 0.5 (.whl5) with fp8_attention instead: decode rows on XQA (no FlashInfer decode plan).
      [ -n "${CFG70:-}" ] || CFG70='{"kv_cache_dtype": "fp8_e4m3", "linear_dtype": "fp8_e4m3", "attention_backend":
        "triton", "kv_cache_memory_fraction": 0.96}'
      path70=$PYTHONPATH
      if [ "${XQA70:-0}" = 1 ]; then
        path70=$FI5
        CFG70='{"kv_cache_dtype": "fp8_e4m3", "linear_dtype": "fp8_e4m3", "attention_backend": "flashinfer",
          "fp8_attention": true, "kv_cache_memory_fraction": 0.96}'
      fi
      PYTHONPATH=$path70 PYTORCH_CUDA_ALLOC_CONF=${ALLOC70:-expandable_segments:True} run offline_70b ${S70:-400} python3 -m \
        benchmarks.bench_offline --shape llama3-70b --fp8-build ${LAYERS70:+--layers $LAYERS70} --workloads 1024x512 \
        --requests ${REQUESTS70:-256} --no-static --log-level INFO --config "$CFG70" --out "$OUT/offline_70b.json" ;;
    xqa_tests) PYTHONPATH=$FI5 run pytest_xqa ${TESTS_S:-300} python3 -m pytest -m cuda -q -p no:cacheprovider -rA tests/test_xqa.py ;;
    xqa_probe) PYTHONPATH=$FI5 run xqa ${XQA_S:-220} python3 -m benchmarks.research.probe_xqa --out "$OUT/xqa.json" ;;
    xqa_engine) # the engine with fp8_attention (FlashInfer 0.5.3) against bf16 (.whl's FlashInfer), one process each
      for pair in 'bf16|{}' 'fp8_kv_xqa|{"kv_cache_dtype": "fp8_e4m3", "fp8_attention": true}' \
                  'fp8_both_xqa|{"kv_cache_dtype": "fp8_e4m3", "fp8_attention": true, "linear_dtype": "fp8_e4m3"}'; do
        path=$PYTHONPATH; [ "${pair%%|*}" = bf16 ] || path=$FI5
        PYTHONPATH=$path run "offline_${pair%%|*}" ${OFFLINE_S:-150} python3 -m benchmarks.bench_offline \
          --workloads 1024x512 --requests ${REQUESTS:-256} --no-static --config "${pair#*|}" --out "$OUT/offline_${pair%%|*}.json"
      done ;;
    budget) # the engine at step budgets (BUDGETS: "auto" and token counts), 1024/512, REQUESTS (1,000 by default), one
      # process each: on an H200 "auto" is 1,024 and bounds the running batch while prompts wait (RESULTS, seventh
      # session); NF_CONFIG's other fields apply to every row
      for budget in ${BUDGETS:-auto 2048 4096}; do
        cfg=$(python3 -c "import json, sys; c = json.loads(sys.argv[1]); b = sys.argv[2]
c['max_num_tokens'] = b if b == 'auto' else int(b); print(json.dumps(c))" "$NF_CONFIG" "$budget")
        run "offline_budget_$budget" ${OFFLINE_S:-130} python3 -m benchmarks.bench_offline --workloads 1024x512 \
          --requests ${REQUESTS:-1000} --no-static --config "$cfg" --out "$OUT/offline_budget_$budget.json"
      done ;;
    setup) ;;  # the wheels and env.txt only
    *.py) module=${step%.py}; run "$(basename "$step" .py)" 300 python3 -m "${module//\//.}" ;;  # a script path
    *) run "$step" 300 python3 -m "$step" ;;  # a module name, e.g. benchmarks.research.probe_gemm_cuts
  esac
done
