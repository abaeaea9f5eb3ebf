"""Execution: where an operator's batches run. Never imports `dataflowmm.operators`.

`LocalRunner` (this process) is the default runner of `FileStorage`; a pipeline picks
another with `FileStorage(..., runner=...)`.
"""

from dataflowmm.execution.local_runner import LocalRunner
from dataflowmm.execution.step import StepSummary

__all__ = ["LocalRunner", "StepSummary"]
