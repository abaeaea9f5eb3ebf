"""The `dataflowmm` command: init, demo, models, export, gallery."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click

from dataflowmm.console import DEBUG_FLAG, quiet_model_libraries, run_script
from dataflowmm.models.tiny import (
    TINY_MODELS,
    TRAINED_MODELS,
    build_tiny_models,
    default_models_dir,
    is_built,
    model_folder_name,
)
from dataflowmm.scaffold import init_project, load_pipeline_module
from dataflowmm.serving.model_source import TINY_PREFIX, TRAINED_PREFIX

# The demo runs each scaffolded pipeline with --tiny, in this order.
DEMO_PIPELINES = [
    ("shapes_world_pipeline.py", "shapes_world"),
    ("text_to_image_generation_pipeline.py", "text_to_image"),
    ("image_captioning_pipeline.py", "image_captioning"),
    ("image_augmentation_pipeline.py", "image_augmentation"),
    ("image_generation_task_pipeline.py", "image_generation_task"),
    ("image_difference_caption_pipeline.py", "image_difference"),
    ("visual_qa_pipeline.py", "visual_qa"),
    ("image_editing_pipeline.py", "image_editing"),
]
# These talk to a loopback chat server through the openai client (the `api` extra).
NEEDS_OPENAI = ("visual_qa", "image_editing")
# The demo ends by pointing at this pipeline's gallery page (written by its publish step): the
# shapes world's images mean something, so a person can judge them, captions and scores.
DEMO_GALLERY = "shapes_world"


@click.group()
@click.version_option(package_name="dataflowmm")
@click.option(DEBUG_FLAG, is_flag=True, help="show tracebacks and the model libraries' messages")
def main(debug: bool) -> None:
    """Synthesise and curate image-text training data with storage-stepped pipelines."""


def run(argv: list[str] | None = None) -> None:
    """The `dataflowmm` command: a mistake prints one line, Ctrl-C one line (`--debug`: tracebacks)."""

    def invoke(arguments: list[str]) -> None:
        try:
            code = main.main(args=arguments, prog_name="dataflowmm", standalone_mode=False)
        except click.exceptions.Abort as abort:  # click turns Ctrl-C into Abort
            raise (abort.__context__ or KeyboardInterrupt()) from None
        except click.ClickException as error:
            error.show()
            raise SystemExit(error.exit_code) from None
        if isinstance(code, int) and code:
            raise SystemExit(code)

    run_script(invoke, argv)


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite existing gpu_pipelines/ and example_data/")
def init(directory: Path, force: bool) -> None:
    """Scaffold ./gpu_pipelines and ./example_data in DIRECTORY (default: here)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        written = init_project(directory, force=force)
    except FileExistsError as error:
        raise click.ClickException(str(error)) from None
    for path in written:
        click.echo(f"created {path}")
    click.echo(f"next: cd {directory / 'gpu_pipelines'} && python text_to_image_generation_pipeline.py --tiny")


@main.command()
@click.option("--out", default="dataflowmm_demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="folder for scaffolds and outputs")
def demo(out: Path) -> None:
    """Run every scaffolded pipeline end to end on tiny offline models."""
    if not click.get_current_context().find_root().params.get("debug"):
        quiet_model_libraries()
    out.mkdir(parents=True, exist_ok=True)
    init_project(out, force=True)
    for script, name in DEMO_PIPELINES:
        click.echo(f"== {script} --tiny")
        if name in NEEDS_OPENAI and importlib.util.find_spec("openai") is None:
            click.echo("   skipped: the loopback chat server is spoken to through the openai client "
                       "(pip install 'dataflowmm[api]')")
            continue
        module = load_pipeline_module(out / "gpu_pipelines" / script)
        summaries = module.main(["--tiny", "--cache-path", str(out / "cache_local" / name)])
        if name == "shapes_world":
            _show_shapes_world(summaries)
            continue
        if name == "visual_qa":
            _show_visual_qa(summaries)
            continue
        if name == "image_editing":
            _show_image_editing(summaries)
            continue
        for summary in summaries if isinstance(summaries, list) else [summaries]:
            _show_output(summary.output_path)
    click.echo(f"demo finished: outputs under {out.resolve() / 'cache_local'}")
    click.echo(f"gallery: {out.resolve() / 'cache_local' / DEMO_GALLERY / 'gallery.html'}")


def _show_shapes_world(summaries: list, rows_shown: int = 8) -> None:
    """prompt -> what the captioner saw in the generated image, and the image-prompt score."""
    scored = [json.loads(line) for line in open(summaries[2].output_path, encoding="utf-8")]
    kept = {row["id"] for row in map(json.loads, open(summaries[3].output_path, encoding="utf-8"))}
    click.echo(f"   {'prompt':40s} {'caption of the generated image':40s} score  kept")
    for row in scored[:rows_shown]:
        score = row["clip_score"][0] if row.get("clip_score") else float("nan")
        click.echo(f"   {row['prompt']:40s} {row.get('caption') or '':40s} {score:5.2f}  "
                   f"{'yes' if row['id'] in kept else 'no'}")
    click.echo(f"   images: {Path(summaries[0].output_path).parent}; kept rows: {summaries[3].output_path}")


def _show_visual_qa(summaries: list) -> None:
    """question -> the server's answer (and the truth the example data carries); one conversation."""
    answered = [json.loads(line) for line in open(summaries[0].output_path, encoding="utf-8")]
    asked = max(len("question"), *(len(row["question"]) for row in answered))
    said = max(len("answer"), *(len(row["answer"] or row["error"]) for row in answered))
    click.echo(f"   {'question':{asked}s}  {'answer':{said}s}  truth")
    for row in answered:
        click.echo(f"   {row['question']:{asked}s}  {row['answer'] or row['error']:{said}s}  {row.get('truth', '')}")
    conversation = json.loads(open(summaries[1].output_path, encoding="utf-8").readline())["conversations"]
    click.echo("   conversation of the first image: " + json.dumps(conversation, ensure_ascii=False)[:300])
    click.echo(f"   answers: {summaries[0].output_path}; conversations: {summaries[1].output_path}")


def _show_image_editing(summaries: list) -> None:
    """instruction -> what the verifier said about the edit (its scores, or why it was dropped)."""
    verified = summaries[3]
    rows = [json.loads(line) for line in open(verified.output_path, encoding="utf-8")]
    if verified.dropped_path:
        rows += [json.loads(line) for line in open(verified.dropped_path, encoding="utf-8")]
    click.echo(f"   {'instruction':26s} {'directional':>11s} {'target':>6s}  verdict")
    for row in sorted(rows, key=lambda row: row["id"]):
        scores = row["edit_scores"]
        verdict = row.get("dropped_by", "kept").removeprefix("EditVerifier: ")
        click.echo(f"   {row['instruction']:26s} {scores['directional']:11.2f} {scores['target_score']:6.2f}  {verdict}")
    click.echo(f"   edit triples: {summaries[-1].output_path}")


def _show_output(output_path: str, rows_shown: int = 2) -> None:
    rows = [json.loads(line) for line in open(output_path, encoding="utf-8")]
    click.echo(f"   {len(rows)} rows in {output_path}")
    for row in rows[:rows_shown]:
        click.echo("   " + json.dumps(row, ensure_ascii=False)[:300])


@main.group()
def models() -> None:
    """Offline models: random weights (tiny:NAME), or trained on the shapes world (trained:NAME)."""


@models.command("tiny")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True, type=click.Choice([*TINY_MODELS, *TRAINED_MODELS]),
              help="build only these (repeatable); default: every random-weight model "
                   "(the trained shapes-* models, copied from the shipped weights: name them)")
def models_tiny(directory: Path | None, names: tuple[str, ...]) -> None:
    """Build tiny models into DIRECTORY (default: $DATAFLOWMM_MODELS_DIR or ~/.cache/dataflowmm/models)."""
    built = build_tiny_models(directory or default_models_dir(), list(names) or None)
    for name, path in built.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        click.echo(f"{name:30s} {size / 1e6:6.1f} MB  {path}")
        if name in TRAINED_MODELS:
            from dataflowmm.kit.trained_models import read_training_report

            held_out = read_training_report(path)["shipped"]["held_out"]
            click.echo(f"{'':30s} held-out: {_figures(held_out)}")


@models.command("train")
@click.argument("name", type=click.Choice(list(TRAINED_MODELS)))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write the trained weights here instead of over the package's shipped copy")
def models_train(name: str, out: Path | None) -> None:
    """Train shapes-world model NAME from scratch with the code's recipe and write it as
    shipped weights (float16), by default over the package's copy; prints the held-out
    figures of the trained model and of its float16 copy. Minutes, on 2 CPU cores."""
    import tempfile

    from dataflowmm.kit.trained_models import ship, train

    models_dir = default_models_dir()
    with tempfile.TemporaryDirectory(prefix=f"train-{name}-") as trained:
        train(name, Path(trained), models_dir)
        report = ship(name, Path(trained), out, models_dir)
    where = out or _shipped_folder(name)
    click.echo(f"trained {name} (recipe {report['recipe_hash']}) in {report['training_seconds']:.0f} s "
               f"-> {where}")
    click.echo(f"  held-out, trained (float32):   {_figures(report['held_out'])}")
    click.echo(f"  held-out, shipped (float16):   {_figures(report['shipped']['held_out'])}")


def _shipped_folder(name: str) -> Path:
    from dataflowmm.kit.shipped_weights import shipped_folder

    return shipped_folder(name)


def _figures(held_out: dict) -> str:
    return ", ".join(f"{key} {value:.1%}" for key, value in held_out.items() if isinstance(value, float))


@models.command("list")
def models_list() -> None:
    """Offline models by reference, whether trained or random, where each is, and whether it is built.

    tiny:NAME models have random weights (built in seconds); trained:NAME models were
    trained on the shapes world and ship with the package (copied here on first use), their
    folder's name carrying the hash of the training recipe and a digest of the weights.
    """
    root = default_models_dir()
    for name in [*TINY_MODELS, *TRAINED_MODELS]:
        trained = name in TRAINED_MODELS
        folder = root / model_folder_name(name)
        if is_built(folder):
            state = "built"
        elif trained:
            state = "not copied (shipped; copied on first use)"
        else:
            state = "not built (built on first use)"
        reference = f"{TRAINED_PREFIX if trained else TINY_PREFIX}{name}"
        click.echo(f"{reference:33s} {'trained' if trained else 'random':8s} {state:34s} {folder}")


@main.command("export")
@click.argument("step_file", type=click.Path(path_type=str))
@click.option("--to", "to", type=click.Choice(["hf", "parquet", "llava", "sharegpt", "webdataset"]), required=True,
              help="hf: a saved datasets.Dataset folder (load_from_disk); parquet: one Parquet file; "
                   "llava / sharegpt: conversation JSON with an images folder beside it; "
                   "webdataset: a folder of tar shards (img2dataset's layout)")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--image-column", "image_columns", multiple=True,
              help="column holding images (repeatable); default: detected from the values")
@click.option("--text-column", default=None,
              help="llava/sharegpt without conversations: the text answering --prompt; webdataset: each "
                   "sample's .txt (default: the first of caption, text, prompt, answer, instruction, question)")
@click.option("--conversation-column", default=None,
              help="llava/sharegpt: column of conversations (default: conversations, when the step has it)")
@click.option("--prompt", default=None, help='llava/sharegpt: the question a text answers (default: "Describe the image.")')
@click.option("--link", is_flag=True, help="llava/sharegpt: hard-link images instead of copying them")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="webdataset: samples per tar shard  [default: 10000]")
def export(step_file: str, to: str, out: str, image_columns: tuple[str, ...], text_column: str | None,
           conversation_column: str | None, prompt: str | None, link: bool, shard_size: int | None) -> None:
    """Export STEP_FILE as a training set: --to hf OUT_DIR, --to parquet OUT.parquet,
    --to llava OUT.json, --to sharegpt OUT.json, --to webdataset OUT_DIR. STEP_FILE and OUT
    may be URLs (s3://, gs://, az://, ...; credentials the backend's standard way)."""
    from dataflowmm.export import export_step

    _require_file(step_file)

    options = {"conversation_column": conversation_column, "text_column": text_column, "prompt": prompt,
               "link": link or None, "shard_size": shard_size}
    options = {name: value for name, value in options.items() if value is not None}
    try:
        report = export_step(step_file, to, out, list(image_columns) or None, **options)
    except TypeError as error:
        raise click.UsageError(str(error)) from None
    except (ImportError, KeyError, ValueError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # no repr quotes
        raise click.ClickException(str(message)) from None
    click.echo(report.summary())


@main.command("gallery")
@click.argument("step_file", type=click.Path(path_type=str))
@click.option("-o", "--out", default="gallery.html", show_default=True, type=click.Path(path_type=Path),
              help="the HTML page to write")
@click.option("--link", is_flag=True,
              help="link image files relative to the page instead of embedding thumbnails")
@click.option("--image-column", "image_columns", multiple=True,
              help="column holding images (repeatable); default: detected from the values")
@click.option("--page-size", default=48, show_default=True, type=click.IntRange(min=1), help="rows per page")
def gallery(step_file: str, out: Path, link: bool, image_columns: tuple[str, ...], page_size: int) -> None:
    """Write one HTML page showing STEP_FILE's rows: images, text, scores and errors. A STEP_FILE
    on a store (s3://...) is read through a local copy of it and its images."""
    from dataflowmm.gallery import build_gallery
    from dataflowmm.io.remote import is_url
    from dataflowmm.store import fetch_step_copy

    _require_file(step_file)
    try:
        if is_url(step_file):
            step_file = fetch_step_copy(step_file)
        written = build_gallery(step_file, out, image_columns=list(image_columns) or None,
                                embed=not link, page_size=page_size)
    except (KeyError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"gallery: {written.resolve()}")


def _require_file(step_file: str) -> None:
    """A local STEP_FILE must be an existing file (as click's `exists=True` checked); a URL
    is checked when it is read."""
    from dataflowmm.io.remote import is_url

    if not is_url(step_file) and not Path(step_file).is_file():
        raise click.BadParameter(f"File '{step_file}' does not exist.", param_hint="'STEP_FILE'")
