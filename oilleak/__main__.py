# `python -m oilleak ...`, which is also what `torchrun -m oilleak train ...` runs on every rank.
from oilleak.cli import main

main()
