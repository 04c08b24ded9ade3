#!/usr/bin/env bash
# The YOLO peer's own virtual environment (bench/.yolo-venv by default): ultralytics with the torch /
# torchvision pair of constraints.txt. The peer is measured beside oilleak, never imported by it.
#   bash bench/setup_yolo_peer.sh [VENV_DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-$HERE/.yolo-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$HERE/../constraints.txt" "ultralytics==8.4.190" pycocotools torch torchvision
"$VENV/bin/python" -c "import ultralytics, torch; print('ultralytics', ultralytics.__version__, 'torch', torch.__version__)"
