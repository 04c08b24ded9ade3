#!/usr/bin/env bash
# The 17 extra float64 parity fixtures of BENCHMARKS.md ("RPN losses against mmdetection"), made with the
# peer's generator, then oilleak parity on each with 1 and 2 threads, and the compact RPN references of
# tests/data/mmdet_rpn. Needs the peer (bash ../shared/peers/mmdet/setup_cpu.sh /tmp/mmdet_peer) and ~700 MB.
#   bash bench/rpn_fixtures.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/fx}; PEER=${PEER:-/tmp/mmdet_peer/bin/python}; GEN=../shared/peers/mmdet/make_parity_fixture.py
B=../shared/data/bsdata/train; P=01_200902053521_585000_090_crop_2; Q=01_200905081805_560000_000_crop_2
mkdir -p "$OUT/src"; .venv/bin/python bench/rpn_fixture_images.py "$B" "$OUT/src"
fx() { "$PEER" "$GEN" "$OUT/$1.pt" "$2.json" "$2.jpg" --variant "${5:-detectors}" --seed "$3" --scale "$4" --double --threads 1 > "$OUT/$1.log" 2>&1; }
for s in 1 2 3 4 5 6 7 8 9 10 11; do fx d1130_s$s $B/$P $s 0.5; done
fx portrait_s4 "$OUT/src/portrait" 4 0.5; fx edge_s5 "$OUT/src/edge" 5 0.5; fx edgebr_s6 "$OUT/src/edge_br" 6 0.5
fx many_s7 "$OUT/src/many" 7 0.25; fx pad_s12 $B/$Q 12 0.41; fx htc_edge_s13 "$OUT/src/edge" 13 0.5 htc
for t in 1 2; do for f in "$OUT"/*.pt; do
  echo "$t threads $(basename "$f"): $(.venv/bin/oilleak parity "$f" --threads $t 2>&1 | grep -E 'checks (pass|fail)')"
done; done
for pair in d1130_s9:rpn_pos_ties_1130 pad_s12:rpn_other_photo_scale041 edgebr_s6:rpn_edge_bottom_right \
            edge_s5:rpn_edge_top_left many_s7:rpn_many_instances portrait_s4:rpn_portrait; do
  cp "$OUT/${pair%%:*}.pt" "$OUT/ref_${pair##*:}.pt"
done
mkdir -p "$OUT/ref"; for f in "$OUT"/ref_*.pt; do n=$(basename "$f"); mv "$f" "$OUT/ref/${n#ref_}"; done
"$PEER" tests/tools/mmdet_rpn_reference.py tests/data/mmdet_rpn "$OUT"/ref/*.pt
