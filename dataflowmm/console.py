"""How the command line reports: one line per mistake, one line for Ctrl-C, tracebacks on request.

Library calls raise as usual; only the scripts (`gpu_pipelines/*.py`) and the `dataflowmm`
command go through `run_script`. `--debug` (anywhere on the command line) or
`DATAFLOWMM_DEBUG=1` shows the full traceback and the model libraries' own messages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "DATAFLOWMM_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def run_script(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)`; a failure prints one line to stderr and exits non-zero.

    `--debug` is taken out of `argv` before `main` sees it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [argument for argument in argv if argument != DEBUG_FLAG]
    if not debug:
        quiet_model_libraries()
    try:
        return main(argv)
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        print(interrupted_line(interrupt), file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:  # noqa: BLE001 (every failure becomes one line unless --debug)
        if debug:
            raise
        print(error_line(error), file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def error_line(error: BaseException) -> str:
    """`error: <cause>` on one line, with how to see more."""
    # KeyError's str() is the repr of its argument; the message itself reads better.
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(str(message).split()) or type(error).__name__
    return f"error: {message} (--debug shows the traceback)"


def interrupted_line(interrupt: BaseException) -> str:
    """What a Ctrl-C left behind (a step says what it saved), on one line."""
    message = " ".join(str(interrupt).split())
    return message if message else "interrupted; finished steps and chunks are kept: run the same command to resume"


def quiet_model_libraries() -> None:
    """Our step lines are the output: silence the model and data libraries' bars and notices."""
    import warnings

    # datasets and huggingface_hub read these when imported; one already imported is told directly.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()

    try:
        import diffusers
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)\b")
    warnings.filterwarnings("ignore", module=r"huggingface_hub\b")  # deprecation notices of its own
