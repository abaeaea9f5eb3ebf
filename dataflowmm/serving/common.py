"""Checks and helpers every serving class shares."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dataflowmm.serving.model_source import hub_unreachable_hint, is_offline_model, model_source


def check_model_reference(model: str | os.PathLike) -> str:
    """`model` as a string; a local path (one that exists, or starts with "/", "." or "~")
    must be an existing folder, else FileNotFoundError naming it. Hub ids pass unchecked."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a hub id, a local folder, tiny:NAME or trained:NAME, got {model!r}")
    if is_offline_model(model):
        return model
    looks_local = os.path.exists(model) or model.startswith(("/", ".", "~"))
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(
            f"model folder {model!r} does not exist (or is not a folder); "
            "give an existing local folder, e.g. one built with `dataflowmm models tiny DIR`"
        )
    return str(Path(model).expanduser()) if looks_local else model


def model_load_error(model: str, exc: BaseException) -> RuntimeError:
    """The error raised when `model` cannot be loaded, with what to do about it."""
    unreachable = hub_unreachable_hint(model)
    if unreachable is not None:
        return RuntimeError(f"could not load model {model!r}: {unreachable}")
    detail = " ".join(str(exc).split()).rstrip(".")
    return RuntimeError(
        f"could not load model {model!r} ({type(exc).__name__}: {detail}). "
        "Without network access give a local model folder (for offline tests and demos, "
        "build tiny ones with `dataflowmm models tiny DIR`)."
    )


# Releases from which from_pretrained takes `dtype` (and warns on `torch_dtype`); older ones
# know only `torch_dtype` and would silently ignore `dtype`.
_DTYPE_KEYWORD_SINCE = {"transformers": "4.56", "diffusers": "0.42"}


def dtype_keyword(library: str = "transformers") -> str:
    """The keyword `library`'s from_pretrained takes the dtype by: "dtype" or "torch_dtype"."""
    import importlib

    from packaging.version import Version

    version = importlib.import_module(library).__version__
    return "dtype" if Version(version) >= Version(_DTYPE_KEYWORD_SINCE[library]) else "torch_dtype"


class GenerationFailed(Exception):
    """One item of a serving call failed; the serving returns it in that item's place, so
    only its row fails and the rest of the batch goes on.

    `transient` is true when the failure may pass later (429, 5xx, time-out, connection
    error, out of memory): the step records the row as such and its next run retries it."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # picklable with its flag (results cross process boundaries)
        return (type(self), (str(self), self.transient))


def jsonable(value: Any) -> Any:
    """`value` turned into plain JSON types (anything else becomes its str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@runtime_checkable
class Serving(Protocol):
    """What every serving offers besides its model calls.

    The constructor only checks arguments; `load()` loads lazily on first use (or when
    called), `cleanup()` frees the model, `config()` is the JSON-able identity of everything
    that changes outputs (it fingerprints cached steps), `loaded` says whether it is loaded.
    """

    def load(self) -> None: ...

    def cleanup(self) -> None: ...

    def config(self) -> dict: ...

    @property
    def loaded(self) -> bool: ...


def build_serving(
    model: Any,
    serving_class: type,
    *,
    argument: str,
    settings: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    methods: tuple[str, ...] = (),
    required: dict[str, Any] | None = None,
) -> Any:
    """A serving from a hub id or local folder, or `model` itself when it already is one.

    Args:
        model: a hub id, a local folder, or a serving instance.
        serving_class: the class built from an id or folder.
        argument: the caller's argument name, for messages.
        settings: the serving settings the caller was given explicitly (`None` = not given).
        defaults: values for the settings not given, used when building.
        methods: methods a serving instance must have.
        required: attribute values a serving instance must have (e.g. `{"task": "image2image"}`).

    A setting given explicitly together with a serving instance is an error when the
    serving's own value differs: it would otherwise be silently ignored.
    """
    given = {key: value for key, value in (settings or {}).items() if value is not None}
    if isinstance(model, (str, os.PathLike)):
        return serving_class(model, **{**(defaults or {}), **given})
    missing = [name for name in methods if not callable(getattr(model, name, None))]
    if missing:
        raise ValueError(f"{argument} must be a model id, a local folder or a {serving_class.__name__}; "
                         f"{model!r} has no {', '.join(missing)}")
    for name, value in (required or {}).items():
        if getattr(model, name, None) != value:
            raise ValueError(f"{argument} must be a serving with {name}={value!r}, "
                             f"got {name}={getattr(model, name, None)!r}")
    for name, value in given.items():
        own = getattr(model, name, None)
        if own != value:
            raise ValueError(
                f"{name}={value!r} conflicts with the serving passed as {argument} ({name}={own!r}): "
                f"set {name} on the serving, or pass a model id or folder instead of a serving"
            )
    return model


class TravellingServing:
    """Pickling for servings sent to other processes (Ray actors, one per GPU).

    A serving travels without its loaded models (the receiving process loads its own,
    lazily) and, unless a device was pinned, picks the devices of the process it lands in:
    the driver may have no GPU while every worker has one.
    """

    _unloaded: dict[str, Any] = {}
    _device_request: str | Sequence[str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, **{name: copy.copy(value) for name, value in self._unloaded.items()}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._place(self._device_request)

    def _place(self, device: str | Sequence[str] | None) -> None:
        """Choose devices (and dtypes) for `device`, or for this process when None."""
        raise NotImplementedError


@dataclass
class Replica:
    """One copy of a model on one device, with its own processor: a fast tokenizer must not
    be used by two threads at once, and the replicas run in threads."""

    device: str
    processor: Any
    model: Any


class LocalModelServing(TravellingServing):
    """A travelling serving of one local model: the settings every local serving takes
    (model, batch_size, torch_dtype, device, revision, trust_remote_code), its placement and
    its loading.

    Placement: one replica per device of `self.devices`, every visible GPU (else the CPU)
    unless `device` pins one device or lists several; `self.dtype` is `torch_dtype` resolved
    for the first ("auto": bfloat16 on CUDA, float32 on CPU). `_unloaded` names the
    attributes holding what is loaded, with their unloaded values (here: `_replicas`, one
    `Replica` per device).

    `fitted_batch_size` is the batch size that fit in memory after a batch ran out of it
    (`dataflowmm.serving.fitting`), or None while `batch_size` fits; `cleanup()` and a new
    placement forget it.
    """

    _unloaded: dict[str, Any] = {"_replicas": []}
    fitted_batch_size: int | None = None

    def _set_model_settings(self, model: str | os.PathLike, batch_size: int, torch_dtype: str,
                            device: str | Sequence[str] | None, revision: str | None,
                            trust_remote_code: bool) -> None:
        """Check and keep the settings every local serving takes; nothing is loaded."""
        from dataflowmm.checks import check_positive_int

        check_positive_int("batch_size", batch_size)
        self.model = check_model_reference(model)
        self.batch_size = batch_size
        self.torch_dtype = torch_dtype
        self._place(device)
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self._unload()

    def _place(self, device: str | Sequence[str] | None) -> None:
        from dataflowmm.serving.device import resolve_devices, resolve_dtype

        self._device_request = device
        self.devices = resolve_devices(device)
        self.dtype = resolve_dtype(self.torch_dtype, self.devices[0])
        self.fitted_batch_size = None  # what fit on other devices says nothing about these

    @property
    def device(self) -> str:
        """The first device."""
        return self.devices[0]

    def _pretrained(self, library: str = "transformers") -> tuple[str, dict, dict]:
        """What from_pretrained takes for this serving's model: the name or folder, the
        options for every part, and the dtype option for weights (under `library`'s keyword)."""
        source, options = model_source(self.model)
        options.update(revision=self.revision, trust_remote_code=self.trust_remote_code)
        return source, options, {dtype_keyword(library): self.dtype}

    def _load_processor_and_model(self, model_class: Any) -> tuple[Any, Any]:
        """`AutoProcessor` and `model_class` loaded from the serving's model (on the CPU).

        Any failure becomes `model_load_error`, which says what to do about it.
        """
        from transformers import AutoProcessor

        try:
            source, options, dtype = self._pretrained()
            processor = AutoProcessor.from_pretrained(source, **options)
            loaded = model_class.from_pretrained(source, **dtype, **options)
        except Exception as exc:
            raise model_load_error(self.model, exc) from exc
        return processor, loaded

    def _load_model_replicas(self, model_class: Any) -> list[Replica]:
        """One `Replica` per device: its own processor and `model_class` model, in eval mode."""

        def load_one(device: str) -> Replica:
            processor, model = self._load_processor_and_model(model_class)
            return Replica(device, processor, model.to(device).eval())

        return self._load_replicas(load_one)

    def _load_replicas(self, load_one: Any) -> list[Any]:
        """`load_one(device)` for every device, in order; all or none (memory freed on failure)."""
        from dataflowmm.serving.device import free_memory

        replicas: list[Any] = []
        try:
            for device in self.devices:
                replicas.append(load_one(device))
        except BaseException:
            replicas.clear()
            free_memory()
            raise
        return replicas

    def _unload(self) -> None:
        for name, value in self._unloaded.items():
            setattr(self, name, copy.copy(value))

    def cleanup(self) -> None:
        """Drop what is loaded and free its memory (and forget the batch size that fit); a
        later call reloads it."""
        from dataflowmm.serving.device import free_memory

        self._unload()
        self.fitted_batch_size = None
        free_memory()

    @property
    def loaded(self) -> bool:
        return bool(self._replicas)


def on_replicas(replicas: list[Any], jobs: list[Any], run: Any) -> list[Any]:
    """`run(replica, its_jobs)` for each replica that has jobs: replica r takes jobs r, r + R,
    r + 2R, ... (R replicas) one after another, the replicas in parallel threads. Returns the
    results in replica order; one replica runs in the calling thread."""
    plans = [(replica, jobs[r :: len(replicas)]) for r, replica in enumerate(replicas)]
    plans = [(replica, own) for replica, own in plans if own]
    if len(plans) <= 1:
        return [run(replica, own) for replica, own in plans]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        return list(pool.map(lambda plan: run(*plan), plans))
