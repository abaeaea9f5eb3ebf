"""Our servings vs plain diffusers / transformers loops on full-size random-weight models, one GPU.

SD-1.5, SDXL and FLUX.1-schnell (text to image, images/s) and LLaVA-1.5-7B (captioning,
captions/s) are built from the public configs in gpu_configs/ with random weights created on
the GPU (gpu_models.py), saved to a local folder (tmpfs when it has room) and loaded from it
by both contenders, at the same batch size and settings:

- ours: `LocalImageGenServing.generate` / `LocalCaptionServing.caption`, with the settings a
  user turns on for speed: bf16 ("auto"), SDPA attention (both libraries' default),
  channels-last for the UNet models and regional `torch.compile` of FLUX's transformer
  (`--compile` for every model);
- plain: the folder loaded with `AutoPipelineForText2Image` / `AutoModelForImageTextToText`,
  the same settings applied by hand as diffusers' guides do, called in a loop.

Each contender's first call (compilation, autotuning) is timed on its own; then the rounds
alternate (A B, B A, ...) and the verdict is the median of per-round ratios. Peak GPU memory
is each contender's own: its resident weights plus the largest growth during one of its calls.
Model build, save and load times are printed too. Ends with one table and, per model,
`ratio_vs_plain[NAME]=` (ours / plain items per second), `peak_gib_ours[NAME]=` and
`peak_gib_plain[NAME]=`.

    python benchmarks/gpu.py                 # all four on the GPU (sized for 3-4 minutes on one H200)
    python benchmarks/gpu.py --model flux    # one model (or a comma-separated list)
    python benchmarks/gpu.py --smoke         # every config shrunk, on the CPU: checks this script
    python benchmarks/gpu.py --meta          # full-size parameter counts (meta device) vs the published ones
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, timed  # noqa: E402
from gpu_contenders import (  # noqa: E402
    Contender,
    GpuMemory,
    Settings,
    captioning_contenders,
    diffusion_contenders,
)
from gpu_models import (  # noqa: E402
    CONFIG_FILES,
    ModelSpec,
    build_components,
    load_spec,
    meta_parameter_counts,
    parameter_count,
    save_model,
    weight_bytes,
)

from dataflowmm.serving.device import free_memory, resolve_dtype  # noqa: E402

GIB = 1 << 30
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


def quiet_libraries() -> None:
    """No progress bars or info chatter from diffusers/transformers: the device returns only
    the last 12,000 characters of output, which must hold the table."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------- one model
@dataclass
class ModelResult:
    name: str
    unit: str
    items: int = 0
    parameters: int = 0
    build_s: float = 0.0
    save_s: float = 0.0
    saved_gib: float = 0.0
    load_s: dict[str, float] = field(default_factory=dict)
    first_call_s: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    same_output: bool | None = None
    error: str | None = None
    note: str | None = None

    def rate(self, name: str) -> float:
        return self.items / statistics.median(self.seconds[name])

    def ratio(self) -> float:
        return statistics.median(p / o for o, p in zip(self.seconds["ours"], self.seconds["plain"], strict=True))


def free_space(requested: str | None) -> dict[Path, int]:
    """Candidate folders for the saved model and their free bytes, in order of preference:
    `requested`, else tmpfs (/dev/shm: saving and loading run at memory speed), then the
    temp folder."""
    candidates = [Path(requested)] if requested else [Path("/dev/shm"), Path(tempfile.gettempdir())]
    return {folder: shutil.disk_usage(folder).free for folder in candidates if folder.is_dir()}


def fits(free: int, needed: int) -> bool:
    return free > needed * 1.1 + GIB


def plan_folder(spec: ModelSpec, dtype: torch.dtype, work_dir: str | None) -> tuple[ModelSpec, Path, str | None]:
    """The spec to build (FLUX with fewer layers only when no folder can hold the full one),
    the folder to save it under and, if shrunk, a note saying so."""
    rooms = free_space(work_dir)
    if not rooms:
        raise RuntimeError(f"no folder to save the model in (--work-dir {work_dir!r} does not exist)")
    bytes_each = torch.empty((), dtype=dtype).element_size()
    needed = sum(meta_parameter_counts(spec).values()) * bytes_each
    note = None
    if not any(fits(free, needed) for free in rooms.values()):
        spec, note = fewer_layers(spec, max(rooms.values()) / 1.1 - GIB, bytes_each)
        needed = sum(meta_parameter_counts(spec).values()) * bytes_each
    root = next((folder for folder, free in rooms.items() if fits(free, needed)), None)
    if root is None:
        raise RuntimeError(f"no folder has {needed / GIB:.1f} GiB free for {spec.name}; give --work-dir")
    return spec, root, note


def fewer_layers(spec: ModelSpec, room: float, bytes_each: int) -> tuple[ModelSpec, str | None]:
    """`spec` with its `shrinkable_layers` scaled down so that the model fits in `room` bytes."""
    shrinkable = spec.run.get("shrinkable_layers")
    if not shrinkable:
        return spec, None
    counts = meta_parameter_counts(spec)
    (component, keys), = shrinkable.items()
    other = (sum(counts.values()) - counts[component]) * bytes_each
    scale = min(1.0, (room - other) / (counts[component] * bytes_each))
    entry = spec.components[component]
    config = {**entry["config"], **{key: max(1, int(entry["config"][key] * scale)) for key in keys}}
    layers = lambda values: "+".join(str(values[key]) for key in keys)  # noqa: E731
    note = (f"{spec.name}: {component} with {layers(config)} layers, not the public {layers(entry['config'])}: "
            f"only {room / GIB:.0f} GiB of free space to save it in")
    return replace(spec, components={**spec.components, component: {**entry, "config": config}}), note


def build_and_save(spec: ModelSpec, device: str, dtype: torch.dtype, result: ModelResult,
                   root: Path) -> Path:
    """Build the random model on `device`, save it under `root`, free it; the saved folder."""
    started = time.perf_counter()
    parts = build_components(spec, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result.build_s = time.perf_counter() - started
    networks = [part for part in parts.values() if isinstance(part, torch.nn.Module)]
    result.parameters = sum(parameter_count(network) for network in networks)
    size = weight_bytes(parts)
    folder = Path(tempfile.mkdtemp(prefix=f"dfmm-gpu-{spec.name}-", dir=root))
    log(f"{spec.name}: built {result.parameters / 1e9:.3f} B parameters on {device} in {result.build_s:.1f} s; "
        f"saving {size / GIB:.1f} GiB to {folder}")
    started = time.perf_counter()
    save_model(spec, parts, folder)
    result.save_s = time.perf_counter() - started
    result.saved_gib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / GIB
    del parts, networks
    free_memory()
    left = f"; {torch.cuda.memory_allocated() / GIB:.2f} GiB still allocated" if device.startswith("cuda") else ""
    log(f"{spec.name}: saved in {result.save_s:.1f} s ({result.saved_gib / max(result.save_s, 1e-9):.2f} GiB/s){left}")
    return folder


def measure(contenders: dict[str, Contender], rounds: int, memory: GpuMemory, result: ModelResult) -> None:
    """Load each contender, time its first call, then alternate timed rounds."""
    for name, contender in contenders.items():
        result.load_s[name] = timed(lambda c=contender, n=name: memory.load(n, c.load))
        log(f"{result.name}: {name} loaded in {result.load_s[name]:.1f} s")
    outputs = {}
    for name, contender in contenders.items():
        started = time.perf_counter()
        outputs[name] = memory.call(name, contender.call)
        result.first_call_s[name] = time.perf_counter() - started
        log(f"{result.name}: {name} first call {result.first_call_s[name]:.1f} s")
    result.items = len(outputs["ours"])
    if result.unit == "captions":  # greedy decoding of the same inputs: the same text expected
        result.same_output = outputs["ours"] == outputs["plain"]
    calls = {name: (lambda c=contender, n=name: memory.call(n, c.call)) for name, contender in contenders.items()}
    result.seconds = alternate_rounds(calls, rounds)
    result.peak = dict(memory.peak)


def run_model(name: str, args: argparse.Namespace, device: str) -> ModelResult:
    spec = load_spec(name, smoke=args.smoke)
    result = ModelResult(name, unit="images" if spec.kind == "diffusers" else "captions")
    dtype = resolve_dtype(args.dtype, device)
    folder = None
    try:
        spec, root, result.note = plan_folder(spec, dtype, args.work_dir)
        if result.note:
            log(result.note)
        folder = build_and_save(spec, device, dtype, result, root)
        make = diffusion_contenders if spec.kind == "diffusers" else captioning_contenders
        settings = settings_from(args, device, spec)
        log(f"{name}: {settings}")
        contenders = make(spec, folder, device, dtype, settings)
        measure(contenders, args.rounds or spec.run.get("rounds", 3), GpuMemory(device), result)
        print_verdicts([result])  # at once: a run cut short by its time limit keeps the models done
    except Exception as error:  # one model failing (out of memory, say) must not cost the others
        traceback.print_exc()
        result.error = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        log(f"{name}: failed: {result.error}")
    finally:
        contenders = None
        if "torch._dynamo" in sys.modules:  # compiled code may hold the models: drop it too
            torch._dynamo.reset()
        free_memory()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def settings_from(args: argparse.Namespace, device: str, spec: ModelSpec) -> Settings:
    """`--compile` for every model, else the model's own default on a GPU (compiling on a CPU
    takes minutes); channels-last where the model's run settings ask for it (the UNets)."""
    compile = args.compile or (spec.run.get("compile", "none") if device.startswith("cuda") else "none")
    channels_last = spec.run.get("channels_last", False) and not args.no_channels_last
    return Settings(None if compile == "none" else compile, channels_last, args.vae_tiling)


# --------------------------------------------------------------------- report
def gib(value: int | None) -> str:
    return "-" if not value else f"{value / GIB:.2f}"


def pair(values: dict[str, float]) -> str:
    return f"{values.get('ours', 0):.1f}/{values.get('plain', 0):.1f}"


def print_table(results: list[ModelResult]) -> None:
    header = ["model", "params B", "build s", "save s (GiB)", "load s o/p", "1st call s o/p", "ours /s",
              "plain /s", "ours/plain", "peak GiB o/p"]
    rows = [header]
    for r in results:
        if r.error:
            rows.append([r.name, f"{r.parameters / 1e9:.3f}", f"{r.build_s:.1f}", "", "", "", "", "", "failed", ""])
            continue
        rows.append([r.name + ("*" if r.note else ""), f"{r.parameters / 1e9:.3f}", f"{r.build_s:.1f}",
                     f"{r.save_s:.1f} ({r.saved_gib:.1f})",
                     pair(r.load_s), pair(r.first_call_s), f"{r.rate('ours'):.2f} {r.unit}",
                     f"{r.rate('plain'):.2f}", f"{r.ratio():.3f}",
                     f"{gib(r.peak.get('ours'))}/{gib(r.peak.get('plain'))}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(" | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def print_verdicts(results: list[ModelResult]) -> None:
    for r in results:
        if r.error:
            print(f"failed[{r.name}]={r.error}")
            continue
        per_round = ", ".join(f"{p / o:.3f}" for o, p in zip(r.seconds["ours"], r.seconds["plain"], strict=True))
        print(f"ratio_vs_plain[{r.name}]={r.ratio():.3f}  # per round: {per_round}")
        if r.peak:
            print(f"peak_gib_ours[{r.name}]={gib(r.peak['ours'])} peak_gib_plain[{r.name}]={gib(r.peak['plain'])}")
        if r.same_output is not None:
            print(f"same_captions[{r.name}]={r.same_output}")
        if r.note:
            print(f"note[{r.name}]={r.note}")


def describe_run(args: argparse.Namespace, device: str, names: list[str]) -> None:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    scale = "smoke (every config shrunk)" if args.smoke else "full size"
    print(f"gpu benchmark: {', '.join(names)}; {scale}; {name}; torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, transformers {transformers.__version__}")
    compile = args.compile or ("each model's default" if device.startswith("cuda") else "none")
    print(f"settings (both contenders): dtype {resolve_dtype(args.dtype, device)}, SDPA (library default), "
          f"compile={compile}, channels_last={'off' if args.no_channels_last else 'UNets'}, "
          f"vae_tiling={args.vae_tiling}; alternating rounds after one first call each", flush=True)


def print_meta_counts(names: list[str]) -> None:
    """Full-size parameter counts on the meta device against the published counts."""
    print(f"{'model.component':>28} | {'built (meta)':>15} | {'published':>15} | difference")
    for name in names:
        spec = load_spec(name)
        counts = meta_parameter_counts(spec)
        for component, count in counts.items():
            known = spec.known_parameters.get(component)
            difference = "-" if known is None else f"{(count - known) / known:+.4%}"
            print(f"{name + '.' + component:>28} | {count:>15,} | {known or 0:>15,} | {difference}")
        total = sum(counts.values())
        print(f"{name + ' (all networks)':>28} | {total:>15,} | {sum(spec.known_parameters.values()):>15,} |")


# ----------------------------------------------------------------------- main
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=",".join(CONFIG_FILES),
                        help=f"comma-separated, from {', '.join(CONFIG_FILES)} (default: all)")
    parser.add_argument("--rounds", type=int, help="timed alternating rounds per model (default: the config's)")
    parser.add_argument("--compile", choices=("none", "regional", "full"), default=None,
                        help="torch.compile of the denoiser for every model (default: each config's "
                             "run.compile on a GPU, none on a CPU)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the UNets' weights NCHW")
    parser.add_argument("--vae-tiling", action="store_true", help="tiled VAE decoding (a no-op at native sizes)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="weights and compute (default auto: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--smoke", action="store_true", help="shrink every config (layers, widths, sizes)")
    parser.add_argument("--meta", action="store_true", help="only print full-size parameter counts")
    parser.add_argument("--work-dir", help="where model folders are saved (default: /dev/shm if it has room)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    args = parser.parse_args()
    args.names = [name.strip() for name in args.model.split(",") if name.strip()]
    unknown = [name for name in args.names if name not in CONFIG_FILES]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(CONFIG_FILES)}")
    return args


def main() -> None:
    args = parse_arguments()
    if args.meta:
        print_meta_counts(args.names)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda") and not args.smoke:
        sys.exit("error: full-size models need a GPU; here run --smoke (shrunk models) or --meta (configs)")
    quiet_libraries()
    describe_run(args, device, args.names)
    results = [run_model(name, args, device) for name in args.names]
    print_table(results)
    print_verdicts(results)
    print(f"total_s={time.perf_counter() - STARTED:.1f}")


if __name__ == "__main__":
    main()
