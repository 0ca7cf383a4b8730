"""Training metrics: ``metrics.csv`` (one row per optimizer step), TensorBoard scalars, loss-curve PNG."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from model.losses import LOSS_KEYS

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("step", "epoch", "loss", *LOSS_KEYS, "logit_scale", "grad_norm", "lr_visual", "lr_text",
                  "images_per_s", "data_s", "step_s")


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def progress_bar(enabled: bool):
    """A rich progress bar (steps done / total, time left), or a stand-in with the same methods."""
    if not enabled:
        return _NoBar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


class MetricsLog:
    """``metrics.csv`` (+ TensorBoard) on rank 0. On resume, rows after the resumed step are dropped."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int, tensorboard: bool):
        self.path = Path(out_dir) / "metrics.csv"
        self.enabled, self.rows_written, self.writer, self._last = enabled, 0, None, {}
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self._read() if int(r["step"]) <= resume_step]
        self._last = kept[-1] if kept else {}
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (open across steps)
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                log.info("tensorboard not installed: metrics go to %s only", self.path)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def write(self, metrics: dict) -> None:
        self.rows_written += 1
        self._last = metrics
        if not self.enabled:
            return
        self._csv.writerow(metrics)
        self._file.flush()
        if self.writer is not None:
            for key in METRIC_COLUMNS[2:]:
                self.writer.add_scalar(f"train/{key}", metrics[key], metrics["step"])

    def last_row(self) -> dict:
        return dict(self._last)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def plot_losses(metrics_csv: Path, png: Path) -> Path:
    """Loss curves (total and each term) against step from ``metrics.csv`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [int(r["step"]) for r in rows]
    for key in ("loss", *LOSS_KEYS):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, linewidth=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
