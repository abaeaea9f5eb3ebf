"""Measure how far the golden tests' outputs move across CPU kernels and thread counts.

Not a test: run by hand (`python tests/golden_tolerance.py [test files]`) when the golden pipelines or the
tolerances in `golden_files.py` change. It records the golden files once per configuration
(torch's CPU kernel set via ATEN_CPU_CAPABILITY and oneDNN's via ONEDNN_MAX_CPU_ISA, torch
threads via OMP_NUM_THREADS) into a temporary folder and prints, per golden, the largest
pixel, score and text differences against the first configuration. Another machine's
instruction set is what the kernel sets stand for: the same machine computes through the
code paths an older or newer CPU takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_files import _flat_floats, decode_png, pixel_difference  # noqa: E402

CONFIGS = {
    "native, 2 threads": {"OMP_NUM_THREADS": "2"},
    "native, 1 thread": {"OMP_NUM_THREADS": "1"},
    "native, 4 threads": {"OMP_NUM_THREADS": "4"},
    "AVX2 kernels, 1 thread": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"},
    "baseline kernels (no AVX), 2 threads": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                             "OMP_NUM_THREADS": "2"},
}


def record(folder: Path, env: dict[str, str], tests: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                   env={**os.environ, **env, "DATAFLOWMM_UPDATE_GOLDEN": "1",
                        "DATAFLOWMM_GOLDEN_DIR": str(folder)}, check=True, stdout=subprocess.DEVNULL)


def compare(reference: dict, other: dict) -> dict:
    largest, mean = 0, 0.0
    for path, data in reference["images"].items():
        got = pixel_difference(decode_png(data), decode_png(other["images"][path]))
        largest, mean = max(largest, got[0]), max(mean, got[1])
    ref_rows = [json.loads(line) for line in reference["cache_file"].splitlines()]
    other_rows = [json.loads(line) for line in other["cache_file"].splitlines()]
    texts_same = score_diff = 0.0
    texts = 0
    for a, b in zip(ref_rows, other_rows, strict=True):
        for key, value in a.items():
            if isinstance(value, str):
                texts += 1
                texts_same += value == b[key]
            elif isinstance(value, (float, list)):
                floats = [(x, y) for x, y in zip(_flat_floats([value]), _flat_floats([b[key]]), strict=True)
                          if isinstance(x, float)]
                score_diff = max([score_diff] + [abs(x - y) for x, y in floats])
    return {"max_pixel": largest, "mean_pixel": round(mean, 3), "score": score_diff,
            "text_cells_equal": f"{texts_same:.0f}/{texts}"}


def main() -> None:
    here = Path(__file__).resolve().parent
    tests = sys.argv[1:] or [str(here / "test_golden_outputs.py"), str(here / "test_golden_operators.py")]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, env in CONFIGS.items():
            folders[name] = Path(tmp) / str(len(folders))
            print(f"recording: {name}", file=sys.stderr)
            record(folders[name], env, tests)
        first = next(iter(folders.values()))
        print(f"{'configuration':40} {'golden':28} {'max px':>6} {'mean px':>8} {'score':>8} text cells equal")
        for name, folder in list(folders.items())[1:]:
            for golden in sorted(first.glob("*.json")):
                result = compare(json.loads(golden.read_text()), json.loads((folder / golden.name).read_text()))
                print(f"{name:40} {golden.stem:28} {result['max_pixel']:>6} {result['mean_pixel']:>8} "
                      f"{result['score']:>8.2g} {result['text_cells_equal']}")


if __name__ == "__main__":
    main()
