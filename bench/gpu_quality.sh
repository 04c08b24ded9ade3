#!/usr/bin/env bash
# Quality on real photos in one call of a lent GPU machine (also runs on CPU with small budgets):
#   1. the demo's checkpoint: the tiny preset trained from scratch on BSData minus the demo's sample
#      (sample/bsdata) for $DEMO_S seconds, saved as a float16 state dict $OUT/tiny_bsdata_fp16.pth;
#   2. oilleak's full preset on the 80/20 BSData split for $BUDGET_S seconds of training, mask / box AP at
#      $EVALS points ($OUT/quality_full.{json,png});
#   3. the peer, ultralytics YOLO11n-seg from scratch, on the same split for the same budget
#      ($OUT/quality_yolo11n.{json,png}, scored by oilleak's evaluator), and both curves in one PNG.
# Run from the repository root. Needs, beside the image's torch / torchvision / numpy / pillow / opencv /
# matplotlib / pyyaml / rich / typer: .device/whl/*.whl (oilleak's missing wheels: pycocotools, pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, typer, annotated-doc, as for
# gpu_check.sh; the peer's: ultralytics 8.4.190, ultralytics-platform, ultralytics-thop; polars is not needed),
# and the BSData folder at $BSDATA (e.g. a copy of ../shared/data/bsdata/train in .device/bsdata, 38 MB).
# On a GPU machine the peer shares the image's Python (no venv there); on CPU, bench/setup_yolo_peer.sh.
#   BUDGET_S=60 DEMO_S=90 DEVICE=cuda OUT=$OUT bash bench/gpu_quality.sh     (about 6 minutes on an H200; STEPS="demo full"
#   runs a subset; NAN_S=20 the NaN check of the old from-scratch recipe)
set -u
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-60}
DEMO_S=${DEMO_S:-90}
EVALS=${EVALS:-2}
BSDATA=${BSDATA:-../shared/data/bsdata/train}
FULL_SCALE=${FULL_SCALE:-"1333 800"}
YOLO_IMGSZ=${YOLO_IMGSZ:-1344}
DEMO_SCALE=${DEMO_SCALE:-"512 320"}
WORKERS=${WORKERS:-4}
FULL_PRESET=${FULL_PRESET:-full}  # tiny: the CPU smoke test of this script
VAL_FRACTION=${VAL_FRACTION:-0.2}  # 0.2: the stated 80/20 split; smaller only for a smoke test
SPLIT=${SPLIT:-/tmp/oilleak-bench-bsdata-split}
DEMO_SPLIT=${DEMO_SPLIT:-/tmp/oilleak-demo-split}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg YOLO_OFFLINE=1
if compgen -G ".device/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PY=${PY:-python3}
YOLO_PY=${YOLO_PY:-$PY}
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/quality_summary.txt"; }

STEPS=${STEPS:-"demo full nan yolo"}  # a subset runs only those steps
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has demo; then
log "demo checkpoint: tiny preset, ${DEMO_S} s on $DEVICE"
$PY bench/bench_quality.py --preset tiny --device "$DEVICE" --budget-s "$DEMO_S" --evals 2 --scale $DEMO_SCALE --lr 0.01 --warmup 50 --grad-clip 10 \
    --workers "$WORKERS" --labelme "$BSDATA" --exclude sample/bsdata --split-dir "$DEMO_SPLIT" \
    --val-fraction "$(python3 -c "print(min(0.1, $VAL_FRACTION))")" --out "$OUT/demo_tiny.json" --save-weights "$OUT/tiny_bsdata_fp16.pth" 2>&1 | tail -n 8
log "demo checkpoint: exit ${PIPESTATUS[0]}"
fi

if has full; then
log "oilleak $FULL_PRESET preset: ${BUDGET_S} s on $DEVICE"
$PY bench/bench_quality.py --preset "$FULL_PRESET" --val-fraction "$VAL_FRACTION" --device "$DEVICE" --budget-s "$BUDGET_S" --evals "$EVALS" \
    --scale $FULL_SCALE --workers "$WORKERS" --labelme "$BSDATA" --split-dir "$SPLIT" --lr 0.005 --grad-clip 35 \
    --set model.norm=group --out "$OUT/quality_full.json" 2>&1 | tail -n 8
log "oilleak $FULL_PRESET: exit ${PIPESTATUS[0]}"
fi

if has yolo; then
log "YOLO11n-seg: ${BUDGET_S} s on $DEVICE"
$YOLO_PY bench/bench_quality_yolo.py --model yolo11n-seg.yaml --device "$DEVICE" --budget-s "$BUDGET_S" \
    --evals "$EVALS" --imgsz "$YOLO_IMGSZ" --workers "$WORKERS" --split-dir "$SPLIT" \
    --out "$OUT/quality_yolo11n.json" 2>&1 | tail -n 8
log "YOLO11n: exit ${PIPESTATUS[0]}"
fi
if has nan; then  # the NaN of issue 17: frozen BatchNorm, bsdata.yaml's old recipe
    log "NaN check: $FULL_PRESET preset, frozen BatchNorm, lr 0.02 at batch 2, warmup 500, no clipping, ${NAN_S:-30} s"
    $PY bench/bench_quality.py --preset "$FULL_PRESET" --val-fraction "$VAL_FRACTION" --device "$DEVICE" \
        --budget-s "${NAN_S:-30}" --evals 1 --scale $FULL_SCALE --workers "$WORKERS" --labelme "$BSDATA" \
        --split-dir "$SPLIT" --lr 0.02 --warmup 500 --grad-clip 0 --set train.backbone_norm=frozen --set train.lr_schedule=step \
        --out "$OUT/nan_check_frozen.json" 2>&1 | tail -n 4
fi
if [ -f "$OUT/quality_yolo11n.raw.json" ]; then  # the peer's predictions scored by oilleak's evaluator
    $PY bench/bench_quality.py --score-peer "$OUT/quality_yolo11n.raw.json" --out "$OUT/quality_yolo11n.json" 2>&1 | tail -n 3
fi
if [ -f "$OUT/quality_full.json" ] && [ -f "$OUT/quality_yolo11n.json" ]; then
    $PY bench/bench_quality.py --plot "$OUT/quality_full.json" "$OUT/quality_yolo11n.json" --out "$OUT/quality_curves.png"
fi
rm -rf "$OUT"/*.work "$OUT"/*.yolo  # work dirs: checkpoints and YOLO's copies, too big to bring back
log "done"
