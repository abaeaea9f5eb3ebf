"""Execution: where an operator's batches run. Never imports `dataflowmm.operators`.

`run_step(storage, operator)` runs a bound operator with the storage's runner: `LocalRunner`
(this process) unless the pipeline picked another with `FileStorage(..., runner=...)`.
Operators are seen only through `protocol.StepOperator`.
"""

from dataflowmm.execution.local_runner import LocalRunner, run_step
from dataflowmm.execution.step import StepSummary

__all__ = ["LocalRunner", "StepSummary", "run_step"]
