#!/usr/bin/env bash
# The GPU checks of issue 8 in one bounded run on a CUDA host (benchmarks/RESULTS.md quotes it).
#
#   benchmarks/gpu_check.sh OUT [STAGE...]     stages (default: info tests compare coldstart serve workers):
#     info       nvidia-smi, driver, torch, CUDA
#     compare    python -m benchmarks.gpu compare: floor, compile modes, fp16/bf16, channels_last;
#                picks the fastest setting with full top-1 agreement for the stages after it
#     tests      tests/service/test_runtime_cuda.py under that setting
#     coldstart  seconds to /health/ready: torch.compile, ahead-of-time packages into an empty compile
#                cache, and loading them again (python -m benchmarks.startup, one round)
#     serve      python -m benchmarks.run on the GPU: igcv2-fashion (PNG), the ImageNet preset with
#                photos as JPEG at 224x224, and at camera size 1024x768 (8 images per request)
#     workers    the batching sweep alone (--mode sweep) for igcv2-fashion and the ImageNet preset at
#                224x224 with each IGCV2_WORKERS in $FASHION_WORKERS / $IMAGENET_WORKERS (default "1 4 8"):
#                server processes per GPU
#     p99        igcv2-fashion at half its saturation with smooth arrivals (32 staggered hey processes,
#                bursts of a few requests), for each IGCV2_WORKERS in $FASHION_WORKERS: issue 8's p99 target
#     mps        8 workers with NVIDIA's Multi-Process Service running, so their CUDA contexts share the GPU
#                side by side instead of time-sliced (compare with the workers stage's w8 runs)
#
# Every stage has its own time limit, and OUT/summary.tgz is refreshed after each one, so a run
# cut short still returns what it measured. Stages may be split over several calls on one host:
# their state (the chosen setting, the inductor cache) stays in /tmp/gpu-check.
set -uo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT [STAGE...]}")
shift
stages=${*:-info tests compare coldstart serve workers}
work=/tmp/gpu-check
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$work/inductor-cache}
setting="$work/setting.env"  # IGCV2_COMPILE_MODE / IGCV2_PRECISION / IGCV2_CHANNELS_LAST chosen by compare
[ -s "$setting" ] || echo "IGCV2_COMPILE_MODE=reduce-overhead IGCV2_PRECISION=float16 IGCV2_CHANNELS_LAST=false" >"$setting"

stamp() { echo "=== $(date +%T) $*" | tee -a "$work/stages.log"; }
pack() { tar czf "$out/summary.tgz" -C "$work" --exclude inductor-cache --exclude store --exclude bodies \
  --exclude images --exclude raw . 2>/dev/null; }

choose() {  # the fastest fashion setting at the service's batch (32) among those that agree on 99.5% of 512
  # images (one flip is 0.2%); the 99.9% bar on the whole test split is the tests' job
  python - "$work/compare/compare.json" >"$setting.new" <<'EOF'
import json, sys
runs = [r for r in json.load(open(sys.argv[1]))["runs"] if r["model"] == "fashion" and "buckets" in r
        and r["mode"] != "eager" and (r["top1_agreement"] or 0) >= 0.995]
best = max(runs, key=lambda r: next(b["images_per_s"] for b in r["buckets"] if b["batch"] == 32))
print(f"IGCV2_COMPILE_MODE={best['mode'].removeprefix('aot:')} IGCV2_PRECISION={best['precision']} "
      f"IGCV2_CHANNELS_LAST={str(best['channels_last']).lower()}")
EOF
  [ -s "$setting.new" ] && mv "$setting.new" "$setting"
}

bench() {  # name, limit in seconds, benchmarks.run arguments...
  local name=$1 limit=$2
  shift 2
  stamp "serve $name"
  # shellcheck disable=SC2046
  env $(cat "$setting") timeout "$limit" python -m benchmarks.run --mode throughput --out "$work/serve-$name" \
    --warmup 1 --duration 4 --bucket-seconds 1 --single-seconds 2 --server-warmup 1 "$@" \
    >"$work/serve-$name.log" 2>&1
  echo "exit $?" >>"$work/serve-$name.log"
  tail -n 60 "$work/serve-$name.log"
}

for stage in $stages; do
  case $stage in
  info)
    stamp info
    { nvidia-smi; python -c "import torch, platform; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), platform.python_version())"; nproc; } 2>&1 | tee "$work/info.txt"
    ;;
  compare)
    stamp compare
    timeout 160 python -m benchmarks.gpu compare --out "$work/compare" --compile-timeout 105 \
      --modes "${COMPARE_MODES:-eager,default,reduce-overhead}" 2>&1 |
      tee "$work/compare.log" | grep -v '^{"torch"' | cut -c1-400
    choose || echo "no setting chosen: keeping $(cat "$setting")"
    stamp "chosen: $(cat "$setting")"
    ;;
  tests)
    stamp tests
    mode=$(sed -n 's/.*IGCV2_COMPILE_MODE=\([^ ]*\).*/\1/p' "$setting")
    CUDA_TEST_COMPILE_MODE=$mode CUDA_TEST_REPORT="$work/tests.jsonl" timeout 170 \
      python -m pytest -q -s -p no:cacheprovider tests/service/test_runtime_cuda.py >"$work/tests.log" 2>&1
    grep -E "passed|failed|error|FAILED|Error" "$work/tests.log" | cut -c1-300 | tail -n 25
    ;;
  coldstart)
    stamp coldstart
    # shellcheck disable=SC2046
    timeout 420 python -m benchmarks.startup --rounds 1 --workers 1 --out "$work/coldstart" \
      $(sed 's/\(IGCV2_[A-Z_]*=[^ ]*\)/--server-env \1/g' "$setting") 2>&1 | tail -n 20 | tee "$work/coldstart.log"
    ;;
  serve)
    bench fashion 65 --model fashion --concurrency 1,4,16,64 --no-batching-concurrency 16 --open-loop-rates 0.5 \
      --open-loop-duration 4
    bench imagenet-224 150 --model imagenet --photo-size 224x224 --concurrency 1,16,64 --no-batching-concurrency 16 \
      --open-loop-rates 0.5 --open-loop-duration 4
    [ -z "${SKIP_CAMERA:-}" ] && bench imagenet-camera 60 --model imagenet --photo-size 1024x768 --images-per-request 8 --concurrency 1,4,16 \
      --no-batching-concurrency 4 --open-loop-rates 0.5 --open-loop-duration 4
    ;;
  workers)
    for w in ${FASHION_WORKERS:-1 4 8}; do
      bench fashion-w$w 100 --mode sweep --model fashion --concurrency 16,64,256 --open-loop-rates 0.5 \
        --open-loop-duration 5 --server-env IGCV2_WORKERS=$w
    done
    for w in ${IMAGENET_WORKERS:-1 4 8}; do
      bench imagenet-224-w$w 110 --mode sweep --model imagenet --photo-size 224x224 --concurrency 16,64,256 \
        --open-loop-rates 0.5 --open-loop-duration 5 --server-env IGCV2_WORKERS=$w
    done
    ;;
  p99)
    for w in ${FASHION_WORKERS:-1 4 8}; do
      bench fashion-p99-w$w 100 --mode sweep --model fashion --concurrency 64 --open-loop-rates 0.5 \
        --open-loop-streams 32 --open-loop-interval 0.05 --open-loop-duration 8 --server-env IGCV2_WORKERS=$w
    done
    ;;
  mps)
    export CUDA_MPS_PIPE_DIRECTORY=$work/mps-pipe CUDA_MPS_LOG_DIRECTORY=$work/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
      bench imagenet-224-w8-mps 110 --mode sweep --model imagenet --photo-size 224x224 --concurrency 16,64,256 \
        --open-loop-rates 0.5 --open-loop-duration 5 --server-env IGCV2_WORKERS=8
      bench fashion-w8-mps 100 --mode sweep --model fashion --concurrency 16,64,256 --open-loop-rates 0.5 \
        --open-loop-streams 32 --open-loop-interval 0.05 --open-loop-duration 5 --server-env IGCV2_WORKERS=8
      echo quit | nvidia-cuda-mps-control
    else
      echo "MPS did not start: stage skipped"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    ;;
  *) echo "unknown stage $stage" >&2 ;;
  esac
  pack
done
stamp done
pack
