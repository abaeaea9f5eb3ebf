"""What every operator is: the contract in `dataflowmm.contract`, re-exported for operator authors."""

from dataflowmm.contract import ERROR_KEY, Operator, OperatorSettings, RowError, StepContext

__all__ = ["ERROR_KEY", "Operator", "OperatorSettings", "RowError", "StepContext"]
