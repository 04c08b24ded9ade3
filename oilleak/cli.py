"""The ``oilleak`` command. Thin: parse arguments, call the function that does the work, print.

Every command turns :class:`oilleak.errors.OilleakError` into a red message and exit code 2, never a
traceback. Each command imports its implementation lazily so ``oilleak --help`` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console

from oilleak.errors import OilleakError

app = typer.Typer(
    name="oilleak",
    help="Find and outline oil leaks in substation inspection images (DetectoRS / HTC).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a config value, e.g. --set train.lr=0.01 (repeatable)"),
]


@app.callback()
def _startup() -> None:
    """Runs before every command: a torch/torchvision pair that cannot run the model's ops is the most
    common install problem, so say how to fix it before anything else fails obscurely."""
    from oilleak.deps import require_torchvision_ops

    try:
        require_torchvision_ops()
    except OilleakError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def friendly_errors(func: F) -> F:
    """Run a command; bad input becomes a message and exit code 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OilleakError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly_errors
def convert(
    src: Annotated[Path, typer.Argument(help="folder of labelme JSON files (searched recursively)")],
    out: Annotated[Path, typer.Argument(help="output data_root: annotations/{train,val}.json, train/, val/")],
    classes: Annotated[Optional[str], typer.Option(help="comma-separated class names; fixes ids 1..N")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="allow writing into a non-empty OUT")] = False,
) -> None:
    """Convert a labelme folder into the COCO layout oilleak (and mmdetection) train on."""
    raise OilleakError("convert is not implemented yet")


@app.command()
@friendly_errors
def check(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    gallery: Annotated[Optional[Path], typer.Option(help="write a few images with ground truth drawn")] = None,
    set_: SetOption = None,
) -> None:
    """Check a dataset before training: classes, images, boxes, masks, semantic maps."""
    raise OilleakError("check is not implemented yet")


if __name__ == "__main__":
    app()
