#!/usr/bin/env bash
# The training fault figures (BENCHMARKS.md, "Reliability"): the three tests of tests/test_train_faults.py,
# each a real fault on real processes, with what each printed (what was killed, when, what survived) and
# its time: SIGKILL half-way through writing latest.pth; a 64 MB tmpfs work dir filled up before a
# checkpoint (needs root or CAP_SYS_ADMIN to mount it, else that test skips); rank 1 of 2 (gloo, CPU)
# SIGKILLed under torchrun --max-restarts 1, compared with an uninterrupted run.
# Usage: bench/train_faults.sh   (about 4 minutes of 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest tests/test_train_faults.py -v -s -p no:cacheprovider --durations=0 "$@"
