"""What a training run shows and records (rank 0 only).

- a rich progress bar with ETA, current lr and loss (plain progress lines when the output is a file), and
  a log line for the run's first step, every ``train.log_interval`` steps and its last step (the total is
  ``--max-iters`` when given), so a short or slow run shows and records something from the start;
- ``log.jsonl`` in the work dir: one JSON object per logged step (``"type": "train"``: window means of the
  loss terms, lr, seconds per step, peak memory) and per evaluation (``"type": "val"``: the metrics);
- TensorBoard scalars under ``tb/``;
- ``loss_curve.png``: the loss terms by iteration and the validation mAPs by epoch, redrawn after each
  evaluation and at the end.
Ranks other than 0 record nothing; the losses shown are rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import resource
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from oilleak.files import atomic_write
from oilleak.progress import PlainProgress, make_progress

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss_curve.png"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainLog:
    def __init__(
        self,
        work_dir: Path,
        *,
        enabled: bool,
        console: Console,
        device: torch.device,
        total_steps: int,
        start_step: int,
        log_interval: int,
    ) -> None:
        self.work_dir = work_dir
        self.enabled = enabled
        self.console = console
        self.device = device
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_interval = log_interval
        self._window: dict[str, list[float]] = defaultdict(list)
        self._file = None
        self._tb = None
        self._progress: Progress | None = None
        self._task = None
        self._lines: PlainProgress | None = None  # when the console is not a terminal
        self._last: tuple[int, int, float] | None = None  # (step, epoch, lr) of the last step seen

    def __enter__(self) -> TrainLog:
        if not self.enabled:
            return self
        self._file = open(self.work_dir / LOG_NAME, "a", encoding="utf-8")  # appended to on resume
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it writes

        # purge_step: after a resume, events beyond the resumed step (from the interrupted run) are dropped.
        self._tb = SummaryWriter(str(self.work_dir / "tb"), purge_step=self.start_step or None)
        # logs to a file get the log lines, not bar redraws
        self._progress = make_progress(console=self.console, disable=not self.console.is_terminal, status=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total_steps, completed=self.start_step, status="")
        if not self.console.is_terminal:
            self._lines = PlainProgress(self.console, self.total_steps, "train", start=self.start_step)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if not self.enabled:
            return
        self._progress.stop()
        try:
            if self._window and self._last is not None:  # stopped between log lines (Ctrl-C, SIGTERM, NaN)
                self._log_window(*self._last)
            self._tb.close()
            self._file.close()
            self.plot()
        except OSError:
            if exc_type is None:
                raise
            # the error that ends the training (a full disk, say) is the one to report, not the log's
            # failure to close after it

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hide the progress bar while something else draws its own (rich shows one live display at a time)."""
        if self._progress is None:
            yield
            return
        self._progress.stop()
        try:
            yield
        finally:
            self._progress.start()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def step(self, *, step: int, epoch: int, lr: float, losses: dict[str, float], seconds: float, data_seconds: float,
             total_steps: int | None = None) -> None:
        """Record step ``step`` (1-based count of steps done) of epoch ``epoch`` (1-based); ``total_steps``: a
        new estimate of the last step (a time-budgeted run)."""
        if not self.enabled:
            return
        if total_steps is not None and total_steps != self.total_steps:
            self.total_steps = total_steps
            self._progress.update(self._task, total=total_steps)
            if self._lines is not None:
                self._lines.total = total_steps
        for key, value in losses.items():
            self._window[key].append(value)
        self._window["time"].append(seconds)
        self._window["data_time"].append(data_seconds)
        loss = sum(v for k, v in losses.items() if "loss" in k)
        terms = " ".join(f"{name} {value:.3f}" for name, value in grouped_losses(losses).items())
        status = f"lr {lr:.3g}  loss {loss:.4f} ({terms})"
        self._progress.update(self._task, completed=step, description=f"epoch {epoch}", status=status)
        self._last = (step, epoch, lr)
        if step == self.start_step + 1 or step % self.log_interval == 0 or step >= self.total_steps:
            self._log_window(step, epoch, lr)
            if self._lines is not None:
                self._lines.touch()
        elif self._lines is not None:
            self._lines.update(step, f"epoch {epoch}  {status}")

    def _log_window(self, step: int, epoch: int, lr: float) -> None:
        """One log.jsonl record, TensorBoard scalars and a printed line: the means since the last one."""
        means = {k: sum(v) / len(v) for k, v in self._window.items()}
        self._window.clear()
        means["loss"] = sum(v for k, v in means.items() if "loss" in k)
        record = {"type": "train", "epoch": epoch, "iter": step, "lr": lr, **means,
                  "memory_mb": round(peak_memory_mb(self.device), 1)}
        self._write(record)
        for key, value in record.items():
            if key not in ("type", "epoch", "iter"):
                self._tb.add_scalar(f"train/{key}", value, step)
        terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if "loss" in k and k != "loss")
        self.console.print(
            f"epoch {epoch} iter {step}/{self.total_steps}  lr {lr:.4g}  loss {means['loss']:.4f}  {terms}  "
            f"{means['time']:.2f} s/it (data {means['data_time']:.2f})  mem {record['memory_mb']:.0f} MB",
            highlight=False, markup=False,
        )

    def evaluation(self, *, epoch: int, step: int, metrics: dict[str, float], table: Any) -> None:
        if not self.enabled:
            return
        self._write({"type": "val", "epoch": epoch, "iter": step, **metrics})
        for key, value in metrics.items():
            self._tb.add_scalar(f"val/{key}", value, step)
        self.console.print(f"validation at iteration {step} (epoch {epoch}):", highlight=False, markup=False)
        self.console.print(table)
        self.plot()

    def plot(self) -> None:
        """Redraw ``loss_curve.png`` from ``log.jsonl`` (all runs of this work dir, resumes included)."""
        path = self.work_dir / LOG_NAME
        if not path.is_file():
            return
        plot_curves([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()],
                    self.work_dir / PLOT_NAME)


def grouped_losses(losses: dict[str, float]) -> dict[str, float]:
    """The loss terms summed per part, short enough for the progress bar: rpn, semantic, s0, s1, s2."""
    groups: dict[str, float] = {}
    for key, value in losses.items():
        if "loss" not in key:
            continue
        name = key.split(".")[0] if "." in key else key.removeprefix("loss_").split("_")[0]
        groups[name] = groups.get(name, 0.0) + value
    return groups


def plot_curves(records: list[dict[str, Any]], out: Path) -> None:
    # on matplotlib's Agg canvas, without pyplot, as evaluate/plots.py: no global backend switch, nothing to close
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = {r["iter"]: r for r in records if r["type"] == "train"}  # a resumed step replaces the old one
    val = {r["epoch"]: r for r in records if r["type"] == "val"}
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_map = fig.subplots(1, 2)
    steps = sorted(train)
    curves = {s: {"loss": train[s]["loss"], **grouped_losses({k: v for k, v in train[s].items() if k != "loss"})}
              for s in steps}
    keys = list(dict.fromkeys(k for c in curves.values() for k in c))  # total first, then rpn, semantic, s0...
    for key in keys:
        ax_loss.plot(steps, [curves[s].get(key, float("nan")) for s in steps], label=key,
                     linewidth=2.0 if key == "loss" else 1.0)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss", yscale="log" if steps else "linear")
    if keys:
        ax_loss.legend(fontsize=7)
    epochs = sorted(val)
    for key in ("segm_mAP", "bbox_mAP", "segm_mAP_50", "bbox_mAP_50"):
        if any(key in val[e] for e in epochs):
            ax_map.plot(epochs, [val[e].get(key, float("nan")) for e in epochs], marker="o", label=key)
    ax_map.set(xlabel="epoch", ylabel="mAP", title="validation", ylim=(0, 1))
    if epochs:
        ax_map.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=90)
