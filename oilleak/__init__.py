"""oilleak: find and outline oil leaks in substation inspection images."""

from __future__ import annotations

import re
import sys
from importlib import metadata

__version__ = "0.1.0"

# The oldest releases that have every torch API oilleak calls: torch.onnx.export(..., dynamo=False) (2.5),
# torch.OutOfMemoryError (2.4), torch.amp.GradScaler("cuda") (2.3); torchvision 0.20 is torch 2.5's pair.
# Keep in step with pyproject.toml's dependencies. Only the pair in constraints.txt is tested.
FLOORS = {"torch": (2, 5), "torchvision": (0, 20)}


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '2.14.1+cu130' or '2.5.0a0+git1234'; None if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def below_floor(installed: dict[str, str | None]) -> list[str]:
    """What is missing or older than ``FLOORS``, as 'torch 2.3.1 (needs >= 2.5)'; ``installed`` maps a
    package to its version, None when it is not installed."""
    problems = []
    for name, floor in FLOORS.items():
        version = installed.get(name)
        wanted = f"needs >= {floor[0]}.{floor[1]}"
        if version is None:
            problems.append(f"{name} is not installed ({wanted})")
        elif (have := release(version)) is not None and have < floor:
            problems.append(f"{name} {version} ({wanted})")
    return problems


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _require_torch_floor() -> None:
    """Stop at import with the fix, before a missing API fails deep inside a run (read from the installed
    packages' metadata: importing torch here would slow down every command)."""
    problems = below_floor({name: _installed(name) for name in FLOORS})
    if problems:
        from oilleak.deps import TESTED_PAIR

        print(f"oilleak cannot run with {', '.join(problems)}.\nFix: pip install -c constraints.txt {TESTED_PAIR} "
              "(the pair oilleak is tested with; on a machine without a GPU, both from one index: add --index-url "
              "https://download.pytorch.org/whl/cpu)", file=sys.stderr)
        raise SystemExit(2)  # the CLI's exit status for bad input, and no traceback


_require_torch_floor()

# The Python API (docs/api.md). Imported on first use, so that `import oilleak` and the CLI's start stay quick.
__all__ = ["Detector", "Leak", "OilleakError", "Result", "__version__"]


def __getattr__(name: str):
    if name == "Detector":
        from oilleak.predict.detector import Detector

        return Detector
    if name in ("Result", "Leak"):
        from oilleak.predict import result

        return getattr(result, name)
    if name == "OilleakError":
        from oilleak.errors import OilleakError

        return OilleakError
    raise AttributeError(f"module 'oilleak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
