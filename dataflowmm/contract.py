"""What an operator is: declared columns, recorded parameters and a batch function.

Writing an operator takes four things:

1. subclass `Operator`;
2. declare its `columns` (`Input` and `Output`: the `run()` keyword, the default column
   name, what the column holds) — `run()`, key binding, the required-column check before any
   model loads and the image-path handling follow from the declaration;
3. implement `process_batch(rows, row_ids, context)`, reading and writing the bound column
   names in `self.keys`;
4. fail a row with `self.row_failed(row, message, offset)`: it is kept with its `error`.

Constructor arguments are recorded when the operator is built (as diffusers'
`register_to_config` records a model's), and with each serving's `config()`, the class and
its source, and the bound column names they fingerprint the cached step: nothing is listed
by hand. `save_interval`, `seed`, `save_dir`, `absolute_paths` and `strict` arguments become
`self.settings`. Runs go through `dataflowmm.execution`, which never imports this module.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import os
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from dataflowmm.execution import StepSummary, run_step
from dataflowmm.execution.protocol import (
    DROP_MARK,
    DROPPED_KEY,
    ERROR_KEY,
    EXECUTION_ARGUMENTS,
    TRANSIENT_MARK,
    OperatorSettings,
    RowError,
    Runner,
    StepContext,
    TransientError,
    is_transient,
)

__all__ = ["DROPPED_KEY", "ERROR_KEY", "Column", "Input", "Operator", "OperatorSettings", "Output",
           "RowError", "Runner", "StepContext", "TransientError", "is_transient"]

# Arguments never written to a manifest (servings keep their keys out of `config()` too).
SECRET_ARGUMENTS = frozenset({"api_key", "hf_token", "password"})
_KEEP = object()  # a failed row keeps this column as it arrived


@dataclass(frozen=True)
class Column:
    """One column an operator reads or writes, declared once on the class.

    Args:
        name: attribute of `self.keys` holding the column's bound name.
        keyword: the `run()` keyword that renames it (`input_image_key`).
        default: the column's name when `run()` is not told; `None` leaves it unset.
        doc: what the column holds (the generated `run()` docstring lists it).
        writes: the operator writes this column (else it reads it).
        images: the column holds image paths (read: made absolute for the operator; written:
            generated images, counted and kept relative to the cache file).
        required: (read) some input row must have it; checked before any model loads.
        empty: (written) the value a failed row gets; by default a failed row keeps the column.
        default_from: name of the column whose bound name this one takes when unset.
        only_if: the column's image role applies only when this is true of the operator.
    """

    name: str
    keyword: str
    default: str | None
    doc: str = ""
    writes: bool = False
    images: bool = False
    required: bool = True
    empty: Any = _KEEP
    default_from: str | None = None
    only_if: Callable[[Any], bool] | None = None


def Input(name: str, keyword: str, default: str | None, doc: str = "", *, images: bool = False,  # noqa: N802
          required: bool = True, only_if: Callable[[Any], bool] | None = None) -> Column:
    """A column the operator reads (see `Column`)."""
    return Column(name, keyword, default, doc, images=images, required=required, only_if=only_if)


def Output(name: str, keyword: str, default: str | None, doc: str = "", *, images: bool = False,  # noqa: N802
           empty: Any = _KEEP, default_from: str | None = None,
           only_if: Callable[[Any], bool] | None = None) -> Column:
    """A column the operator writes (see `Column`)."""
    return Column(name, keyword, default, doc, writes=True, images=images, empty=empty,
                  default_from=default_from, only_if=only_if)


class Operator(ABC):
    """Base of all operators: declared columns, recorded arguments, batches of rows.

    Class attributes a subclass may set:
        columns: the `Input`/`Output` columns, in the order of `run()`'s keywords.
        batching_serving: the attribute holding the serving whose `batch_size` (items per
            model call) is also the rows per batch, unless an `input_batch_size` argument is given.
        default_input_batch_size: rows per batch when there is neither.
        execution_arguments: constructor arguments that change how a step runs, not what it
            writes (beyond `save_interval` and `strict`): left out of the fingerprint.
        has_final_pass: the verdict needs every row of the step (see `final_pass`).
    """

    columns: ClassVar[Sequence[Column]] = ()
    batching_serving: ClassVar[str] = "serving"
    default_input_batch_size: ClassVar[int] = 64
    execution_arguments: ClassVar[frozenset[str]] = frozenset()
    has_final_pass: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_arguments(cls.__init__)
        if "columns" in cls.__dict__ and "run" not in cls.__dict__:
            cls.run = _run_method(cls)

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- recorded arguments ---------------------------------------------------------------

    @property
    def arguments(self) -> dict[str, Any]:
        """The constructor arguments this operator was built with, defaults included."""
        return dict(self.__dict__.get("_arguments", {}))

    @property
    def settings(self) -> OperatorSettings:
        """The shared settings, from the constructor arguments of those names."""
        cached = self.__dict__.get("_settings")
        if cached is not None:
            return cached
        arguments = self.__dict__.get("_arguments", {})
        return OperatorSettings(**{f.name: arguments[f.name] for f in fields(OperatorSettings) if f.name in arguments})

    def params(self) -> dict[str, Any]:
        """What the step's fingerprint covers: the class and its source, the recorded
        arguments (minus execution-only ones and secrets), every serving's `config()`, the
        bound column names and where generated images go."""
        return {
            "operator": f"{type(self).__module__}.{type(self).__qualname__}",
            "source": _source_digest(type(self)),
            "arguments": {name: _fingerprintable(name, value) for name, value in sorted(self.arguments.items())
                          if name not in EXECUTION_ARGUMENTS | SECRET_ARGUMENTS | self.execution_arguments},
            "servings": {name: value.config() for name, value in sorted(vars(self).items()) if _is_serving(value)},
            "columns": dict(vars(self.keys)),
            "save_dir": str(self.configured_save_dir().resolve()) if self.configured_save_dir() else None,
        }

    # -- columns --------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # `keys` is a plain attribute once bound (read per row: no property on the hot path);
        # before any run() it is the declared defaults.
        if name == "keys":
            return _bound(self.columns, {})
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def bind(self, **keys: str | None) -> Operator:
        """A copy of this operator reading and writing the columns named by `keys` (the
        `run()` keywords); servings are shared, not copied."""
        return self._bound_to(_bound(self.columns, keys))

    def _bound_to(self, keys: Any) -> Operator:
        bound = copy.copy(self)
        bound.keys = keys  # the bound column names of this run, by column name
        return bound

    def run(self, storage: Any, *args: Any, **keys: Any) -> StepSummary:
        """Run on `storage`'s step (`storage.step()`); each operator documents its keywords."""
        raise TypeError(f"{self.name} declares no columns: declare `columns` or define run()")

    def run_bound(self, storage: Any, bound: Operator, *, retry_errors: bool = False) -> StepSummary:
        """Hand a bound copy of this operator to the storage's runner; `retry_errors`: a finished
        step recomputes every failed row (not only those that failed transiently)."""
        if retry_errors:
            bound.retry_errors = True
        return run_step(storage, bound)

    def _active(self, column: Column) -> bool:
        return getattr(self.keys, column.name) is not None and (column.only_if is None or column.only_if(self))

    def required_keys(self) -> list[str]:
        """Columns at least one input row must have; checked before any model loads."""
        return [getattr(self.keys, c.name) for c in self.columns
                if not c.writes and c.required and self._active(c)]

    def path_keys(self) -> list[str]:
        """Columns holding image paths (or lists of them), read or written."""
        return list(dict.fromkeys(getattr(self.keys, c.name) for c in self.columns if c.images and self._active(c)))

    def image_output_keys(self) -> list[str]:
        """Columns where this operator writes the paths of images it generates (counted per step)."""
        return [getattr(self.keys, c.name) for c in self.columns if c.writes and c.images and self._active(c)]

    # -- what execution asks ----------------------------------------------------------------

    @property
    def input_batch_size(self) -> int:
        """Rows per `process_batch` call: the `input_batch_size` argument, else the batching
        serving's `batch_size` (items per model call), else `default_input_batch_size`."""
        given = self.__dict__.get("_arguments", {}).get("input_batch_size")
        if given:
            return int(given)
        serving = self.__dict__.get(self.batching_serving)
        if serving is not None and getattr(serving, "batch_size", None):
            return int(serving.batch_size)
        return self.default_input_batch_size

    def keep_dropped_rows(self) -> bool:
        """Whether dropped rows go to `{output}.dropped.jsonl` (with `dropped_by` saying why)
        instead of vanishing: the `keep_dropped` argument, when the operator has one."""
        return bool(self.__dict__.get("_arguments", {}).get("keep_dropped", False))

    def fitted_batch_sizes(self) -> dict[str, int]:
        """By attribute, the batch sizes its servings shrank to so that a batch fits in memory
        (their `fitted_batch_size`); execution records them in the step's manifest."""
        return {name: value.fitted_batch_size for name, value in sorted(vars(self).items())
                if _is_serving(value) and type(getattr(value, "fitted_batch_size", None)) is int}

    def final_pass(self, rows: Iterator[dict]) -> Iterator[dict]:
        """The step's output rows, in order, once all batches are done: rows may be marked
        dropped (`drop_row`) or changed. Runs in the driver, on rows read back from the
        checkpoint, so a resumed or distributed step gets the same result."""
        return rows

    @abstractmethod
    def process_batch(self, rows: list[dict], row_ids: Sequence[str], context: StepContext) -> list[dict]:
        """Output rows for a batch of input rows (may emit more or fewer rows than it got).

        `row_ids[i]` is row i's identity (its position and content in the step's input):
        name files and derive seeds from it. Input rows are read-only: build new dicts
        (`{**row, key: value}`). A row that cannot be processed is returned through
        `row_failed`, which raises `RowError` when `settings.strict`.
        """

    # -- helpers for subclasses -------------------------------------------------------------

    def configured_save_dir(self) -> Path | None:
        """The folder for generated images this operator was given (`save_dir`), if any."""
        return Path(self.settings.save_dir) if self.settings.save_dir else None

    def resolve_save_dir(self, default: Path) -> Path:
        """Folder for this step's generated images: the configured one, else `default`."""
        return self.configured_save_dir() or default

    def row_failed(self, row: dict, message: str, row_offset: int, empty_outputs: dict | None = None, *,
                   transient: bool = False) -> dict:
        """The row kept with its error recorded (raises `RowError` when strict). Written
        columns get `self.empty_outputs()` unless `empty_outputs` says otherwise.
        `transient`: the failure may pass (see `is_transient`): the next run retries the row."""
        if self.settings.strict:
            raise RowError(message, row_offset)
        if empty_outputs is None:
            empty_outputs = self.empty_outputs()
        failed = {**row, **empty_outputs, ERROR_KEY: f"{self.name}: {message}"}
        if transient:
            failed[TRANSIENT_MARK] = True
        return failed

    def empty_outputs(self) -> dict:
        """What a failed row's written columns hold (also when execution fails a row that does
        not fit in memory): each declared column's `empty` value. An operator whose outputs are
        not all declared columns overrides it."""
        return {getattr(self.keys, c.name): copy.copy(c.empty) for c in self.columns
                if c.writes and c.empty is not _KEEP and getattr(self.keys, c.name) is not None}

    def drop_row(self, row: dict, reason: str) -> dict:
        """The row marked to be dropped from the step's output, with the reason (the side file
        of dropped rows gets it as `dropped_by`)."""
        return {**row, DROP_MARK: f"{self.name}: {reason}"}


def _bound(columns: Sequence[Column], keys: dict[str, Any]) -> types.SimpleNamespace:
    names = {column.name: keys.get(column.keyword, column.default) for column in columns}
    for column in columns:
        if names[column.name] is None and column.default_from:
            names[column.name] = names[column.default_from]
    return types.SimpleNamespace(**names)


def _run_method(cls: type) -> Callable[..., StepSummary]:
    """`run(storage, <keyword>=<default>, ...)` for the declared columns, in their order."""
    columns = cls.__dict__["columns"]
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter("storage", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(c.keyword, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=c.default,
                                     annotation="str | None") for c in columns]
    parameters.append(inspect.Parameter("retry_errors", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation="bool"))
    signature = inspect.Signature(parameters, return_annotation="StepSummary")

    def run(self: Operator, *args: Any, **kwargs: Any) -> StepSummary:
        bound = signature.bind(self, *args, **kwargs)
        storage = bound.arguments.pop("storage")
        bound.arguments.pop("self")
        retry_errors = bool(bound.arguments.pop("retry_errors", False))
        return self.run_bound(storage, self.bind(**bound.arguments), retry_errors=retry_errors)

    lines = [f"Run {cls.__name__} on `storage`'s step.", "", "Args:", "    storage: the step (`storage.step()`)."]
    for column in columns:
        default = "" if column.default is None else f" (default `{column.default}`)"
        if column.default is None and column.default_from:
            default = f" (default: the `{_keyword_of(columns, column.default_from)}` column)"
        lines.append(f"    {column.keyword}: {column.doc}{default}")
    lines.append("    retry_errors: recompute every failed row of a finished step (rows that failed "
                 "transiently are always retried).")
    run.__signature__ = signature
    run.__doc__ = "\n".join(lines)
    run.__qualname__ = f"{cls.__qualname__}.run"
    return run


def _keyword_of(columns: Sequence[Column], name: str) -> str:
    return next(column.keyword for column in columns if column.name == name)


def _recording_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """`init` that first records its bound arguments (defaults applied) on the instance.

    The most derived constructor records first; a base constructor it calls adds only the
    arguments not recorded yet, so defaults set deeper down are fingerprinted too.
    """
    signature = inspect.signature(init)

    def recording_init(self: Operator, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        outermost = "_arguments" not in self.__dict__
        recorded = self.__dict__.setdefault("_arguments", {})
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                for key, item in value.items():
                    recorded.setdefault(key, item)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                recorded.setdefault(name, value)
        init(self, *args, **kwargs)
        if outermost:
            self._settings = self.settings  # validated once, when the operator is built

    recording_init.__signature__ = signature
    recording_init.__doc__ = init.__doc__
    recording_init.__wrapped__ = init
    recording_init.__qualname__ = init.__qualname__
    return recording_init


def _is_serving(value: Any) -> bool:
    return not isinstance(value, type) and callable(getattr(value, "config", None))


def _fingerprintable(name: str, value: Any) -> Any:
    """An argument as JSON: servings by their `config()`, paths as strings, containers
    element by element."""
    if _is_serving(value):
        return value.config()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_fingerprintable(name, item) for item in value]
    if isinstance(value, dict):
        return {str(key): _fingerprintable(name, item) for key, item in value.items()}
    text = str(value)
    if " at 0x" in text:
        raise TypeError(f"argument {name!r}: cannot fingerprint a {type(value).__name__} (its text names a "
                        "memory address); pass JSON-able values, paths or servings")
    return text


@functools.cache  # per class object: reading and tokenising the source is most of a small step's set-up
def _source_digest(cls: type) -> str:
    """A digest of the operator's code: a built-in operator's module (its prompts and helpers
    live there), or a user's class alone (so editing the rest of a pipeline script does not
    invalidate its steps); the class's name when the source is unavailable."""
    try:
        if cls.__module__.startswith("dataflowmm."):
            text = inspect.getsource(inspect.getmodule(cls))
        else:
            text = inspect.getsource(cls)
    except (OSError, TypeError):
        text = f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
