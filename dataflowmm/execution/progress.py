"""Progress of a step: a bar on a terminal, steady one-line reports in logs."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from dataflowmm.execution.step import PreparedStep


PROGRESS_INTERVAL_ENV = "DATAFLOWMM_PROGRESS_INTERVAL"


class ProgressLines:
    """Progress for logs: one line every `interval` seconds (rows done, rows/s, ETA).

    Used when stderr is not a terminal (a batch job, `nohup`, CI), where a bar would print
    nothing until the step ends.
    """

    def __init__(self, description: str, total: int, initial: int, interval: float):
        self.description, self.total, self.done = description, total, initial
        self.interval = interval
        self.started = self.last = time.monotonic()
        self.counted = 0  # rows done by this run (the rate ignores resumed rows)

    def update(self, rows: int) -> None:
        self.done += rows
        self.counted += rows
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        rate = self.counted / max(now - self.started, 1e-9)
        left = max(self.total - self.done, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
        return (f"[dataflowmm] {self.description}: {self.done}/{self.total} rows, "
                f"{rate:.3g} rows/s, ETA {eta}")

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc_info) -> None:
        return None


def progress_bar(step: PreparedStep, done: int) -> tqdm | ProgressLines:
    """A bar over the step's input rows on a terminal; progress lines at a steady interval otherwise."""
    description = f"step {step.context.step} {step.operator.name}"
    total = step.storage.count_input_rows()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=done, unit="row", desc=description, file=sys.stderr)
    interval = float(os.environ.get(PROGRESS_INTERVAL_ENV) or 30)
    return ProgressLines(description, total, done, interval)
