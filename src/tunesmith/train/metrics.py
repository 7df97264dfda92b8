"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (flushed per row, so a killed run keeps what it logged)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The logged rows; a last line cut short (the run died or the disk filled mid-write) is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise TunesmithError(f"{path}: line {number} is not a metrics row (a JSON object); the file was changed "
                                 "by hand: remove the line, then try again")
        rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log matches the resumed run exactly."""
    rows = [row for row in read_metrics(run_dir) if row.get("step", 0) <= after_step]
    write_atomic(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


class Progress:
    """A tqdm bar with loss, learning rate, tokens/s (tqdm shows the ETA); nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.last = initial

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(row["step"] - self.last)
        self.last = row["step"]
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
