#!/usr/bin/env bash
# Every GPU check and benchmark in one call of a lent GPU machine (its image has PyTorch with CUDA but no
# package index), as recorded in BENCHMARKS.md. Run from the repository root with, beside it:
#   .device/whl/*.whl                Python 3.12 wheels the image lacks (pycocotools, pydantic, typer, ...)
#   .device/*.pt                     parity fixtures from ../shared/fixtures/mmdet/, each checked on CUDA:
#                                    detectors_htc_small_f64.pt (float64: must match every row end to end;
#                                    42 MB, so with the 64 MiB carry limit usually the only one) and/or
#                                    detectors_htc_small.pt (float32: its stage rows)
#   .peer/                           a copy of ../shared/peers/mmdet (the mmdetection peer; optional)
# Each step has its own time limit, all of them end by $DEADLINE seconds (default 540), and a failing step
# does not stop the next. Logs go to $OUT/gpu_logs.tar.gz after every step, and a line per step to
# $OUT/summary.txt (OUT defaults to ./gpu_out). ONLY="step step ..." runs just those steps.
set -u
OUT=${OUT:-gpu_out}
DEADLINE=${DEADLINE:-540}
LOGS=/tmp/gpu_logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: the command's output to $LOGS/NAME.log, its tail to stdout
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if ((DEADLINE - SECONDS < limit)); then limit=$((DEADLINE - SECONDS)); fi
    if ((limit < 20)); then
        echo "$name: skipped, $limit s left before the deadline" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "=== $name"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-15}" "$LOGS/$name.log"
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tar czf "$OUT/gpu_logs.tar.gz" -C "$LOGS" .
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
step environment 60 bash -c 'nvidia-smi -L; python3 -c "import sys, torch, torchvision; print(sys.version); print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"; python3 -m oilleak --help'

# correctness on CUDA: every stage against mmdetection (TF32 off), then the whole tool through its CLI
for fixture in .device/*.pt; do
    [ -e "$fixture" ] || continue
    TAIL=8 step "parity_cuda_$(basename "$fixture" .pt)" 150 python3 -m oilleak parity "$fixture" --device cuda
done
step demo_cuda 180 python3 -m oilleak demo --device cuda --out /tmp/demo
step train_amp_cli 90 python3 -m oilleak train /tmp/demo/demo.yaml --device cuda --amp --max-iters 6 --work-dir /tmp/amp_run
step resume_amp_cli 90 python3 -m oilleak train /tmp/demo/demo.yaml --device cuda --amp --max-iters 10 --work-dir /tmp/amp_run --resume

# speed and memory of the full detectors_htc_r50 (6 classes, 1333x800, random weights)
step inference_cuda 120 python3 bench/bench_inference.py --device cuda --runs 20 --json "$LOGS/inference_cuda.json"
step train_fp32_b2 150 python3 bench/bench_train.py --preset detectors_htc_r50 --device cuda --batch-size 2 --iters 10
step train_amp_b2 150 python3 bench/bench_train.py --preset detectors_htc_r50 --device cuda --batch-size 2 --iters 10 --amp
step predict_cuda 150 python3 bench/bench_predict.py --device cuda --images /tmp/demo/data/train \
    --presets detectors_htc_r50_tiny:6,detectors_htc_r50:6 --json "$LOGS/predict_cuda.json"

# the peer in the same session: mmdetection 3.3 with mmcv's ops compiled for this GPU
if [ -d .peer ]; then
    step mmdet_peer 240 bash -c 'source .peer/gpu_env.sh && python3 .peer/bench/mmdet_gpu_bench.py /tmp/gpu_logs/mmdet_gpu.json 10'
fi

cat "$OUT/summary.txt" 2>/dev/null
