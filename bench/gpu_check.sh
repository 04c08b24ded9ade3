#!/usr/bin/env bash
# Every GPU check and benchmark in one call of a lent GPU machine (its image has PyTorch with CUDA but no
# package index), as recorded in BENCHMARKS.md. Run from the repository root with, beside it:
#   .device/whl/*.whl                    Python 3.12 wheels the image lacks (pycocotools, pydantic, typer, ...)
#   .device/detectors_htc_small.pt       ../shared/fixtures/mmdet/detectors_htc_small.pt
#   .device/detectors_htc_small_f64.pt   ../shared/fixtures/mmdet/detectors_htc_small_f64.pt
#   .peer/                               a copy of ../shared/peers/mmdet (the mmdetection peer; optional)
# Each step has its own time limit, all of them end by $DEADLINE seconds (default 420), and a failing step
# does not stop the next. Logs go to $OUT/gpu_logs.tar.gz after every step, JSON results to $OUT/*.json,
# and a line per step to $OUT/summary.txt (OUT defaults to ./gpu_out). ONLY="step step ..." runs just those
# steps. CPU_SMOKE=1 runs every step on the CPU with tiny sizes (no wheels, fixtures from ../shared): a check
# of the script itself, not a measurement.
set -u
OUT=${OUT:-gpu_out}
DEADLINE=${DEADLINE:-420}
LOGS=${LOGS:-/tmp/gpu_logs}
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

if [ -n "${CPU_SMOKE:-}" ]; then
    # the same steps on the CPU with tiny sizes; the limits stay the GPU's (a loaded CPU may need more: raise
    # SMOKE_SCALE to multiply them)
    DEV=cpu
    FIXTURES=${FIXTURES:-../shared/fixtures/mmdet}
    PRESET=detectors_htc_r50_tiny
    SIZE=(160 96); BATCHES=(1 2); RUNS=1; ITERS=2; MAXB=2; LOSS_ITERS=2; CAP=30
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    PY=${PY:-python3}
    scale=${SMOKE_SCALE:-1}
    DDP_DEBUG=INFO  # torch 2.14.1 on CPU crashes building any DistributedDataParallel under DETAIL
else
    DEV=cuda
    FIXTURES=.device
    PRESET=detectors_htc_r50
    SIZE=(1333 800); BATCHES=(1 4 8); RUNS=10; ITERS=10; MAXB=64; LOSS_ITERS=100; CAP=60
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3
    scale=1
    DDP_DEBUG=DETAIL
fi
t() { echo $(($1 * scale)); }  # a step's limit, scaled in the CPU smoke run

step environment "$(t 60)" bash -c "nvidia-smi -L 2>/dev/null; $PY -c 'import sys, torch, torchvision; print(sys.version); print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; $PY -m oilleak --help | head -5"

# correctness: mmdetection's float64 fixture end to end, then every float32 stage (TF32 off)
TAIL=8 step parity_f64 "$(t 60)" $PY -m oilleak parity "$FIXTURES/detectors_htc_small_f64.pt" --device "$DEV"
if [ -e "$FIXTURES/detectors_htc_small.pt" ]; then  # 42 MB more than the 64 MiB a call carries, beside the f64
    TAIL=8 step parity_f32 "$(t 60)" $PY -m oilleak parity "$FIXTURES/detectors_htc_small.pt" --device "$DEV"
fi
# several processes (2 gloo ranks on the CPU; NCCL needs one GPU per rank): `oilleak train` under torchrun with
# TORCH_DISTRIBUTED_DEBUG=DETAIL (find_unused_parameters off; torch 2.14.1 on CPU crashes under DETAIL, so the
# CPU smoke run uses INFO), then `oilleak test` on 2 ranks and on 1 process must write the same metrics.json
DDP_SET="--device cpu --set data.data_root=/tmp/ddp/data --set 'data.scale=[320,128]'"
step ddp_cli "$(t 90)" bash -c "set -e; rm -rf /tmp/ddp; export OMP_NUM_THREADS=2
    $PY -m oilleak convert sample/bsdata /tmp/ddp/data --classes Pitting --val-fraction 0.3 >/dev/null
    TORCH_DISTRIBUTED_DEBUG=$DDP_DEBUG $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m oilleak train configs/demo.yaml --max-iters 4 --work-dir /tmp/ddp/work $DDP_SET
    $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m oilleak test configs/demo.yaml /tmp/ddp/work/latest.pth --work-dir /tmp/ddp/two $DDP_SET | tail -3
    $PY -m oilleak test configs/demo.yaml /tmp/ddp/work/latest.pth --work-dir /tmp/ddp/one $DDP_SET | tail -3
    cmp /tmp/ddp/one/*/metrics.json /tmp/ddp/two/*/metrics.json && echo 'metrics.json: 2 ranks = 1 process'"

# speed and memory of the full detectors_htc_r50 (6 classes, 1333x800, random weights)
step inference "$(t 120)" $PY bench/bench_gpu_inference.py --preset "$PRESET" --height "${SIZE[1]}" --width "${SIZE[0]}" \
    --device "$DEV" --runs "$RUNS" --batch "${BATCHES[@]}" --precision fp32 tf32 bf16 --json "$OUT/inference.json"
step train_fp32 "$(t 60)" $PY bench/bench_train.py --preset "$PRESET" --size "${SIZE[@]}" --device "$DEV" --batch-size 2 \
    --iters "$ITERS" --workers 2
step train_amp "$(t 60)" $PY bench/bench_train.py --preset "$PRESET" --size "${SIZE[@]}" --device "$DEV" --batch-size 2 \
    --iters "$ITERS" --workers 2 --amp
step max_batch "$(t 80)" $PY bench/bench_gpu_train.py max-batch --preset "$PRESET" --size "${SIZE[@]}" --device "$DEV" \
    --max-batch "$MAXB" --time-cap "$CAP" --json "$OUT/max_batch.json"

# the peer in the same session: mmdetection 3.3 with mmcv's ops compiled for this GPU
if [ -d .peer ] && [ -z "${CPU_SMOKE:-}" ]; then
    step mmdet_peer 150 bash -c "source .peer/gpu_env.sh && python3 .peer/bench/mmdet_gpu_bench.py $OUT/mmdet_gpu.json 10"
fi

# last, with what time is left: the loss after the same training steps (1 image each) from the same start in
# each precision; every finished precision is in the log even if the deadline cuts the step
step loss_agreement "$(t 120)" $PY bench/bench_gpu_train.py loss-agreement --preset "$PRESET" --size "${SIZE[@]}" \
    --device "$DEV" --iters "$LOSS_ITERS" --batch-size 1 --precisions strict fp32 amp bf16 --json "$OUT/loss_agreement.json"

tar czf "$OUT/gpu_logs.tar.gz" -C "$LOGS" .
cat "$OUT/summary.txt" 2>/dev/null
