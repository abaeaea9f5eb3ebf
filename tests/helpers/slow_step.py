"""A step that runs slowly, for tests that need a second process holding a cache.

`python slow_step.py ENTRY CACHE STARTED_FILE DELAY` runs `SlowCopy` on ENTRY with one row
per batch, sleeping DELAY seconds per batch; STARTED_FILE is written when the first batch
begins (the cache's lock is held by then).
"""

import sys
import time
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.contract import Input, Operator, Output
from dataflowmm.execution.local_runner import run_step


class SlowCopy(Operator):
    columns = [Input("text", "input_text_key", "text"), Output("copy", "output_key", "copy")]
    execution_arguments = frozenset({"delay", "started"})

    def __init__(self, delay=0.0, started=None, input_batch_size=1, save_interval=1):
        self.delay, self.started = delay, started

    def process_batch(self, rows, row_ids, context):
        if self.started:
            Path(self.started).write_text("started")
        time.sleep(self.delay)
        return [{**row, "copy": row["text"].upper()} for row in rows]


def run(entry, cache, delay=0.0, started=None):
    return run_step(FileStorage(entry, cache_path=cache).step(), SlowCopy(delay=delay, started=started))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import slow_step  # the class under its module name, as the test imports it (same fingerprint)

    slow_step.run(sys.argv[1], sys.argv[2], float(sys.argv[4]), sys.argv[3])
