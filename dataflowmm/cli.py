"""The `dataflowmm` command: init, demo, models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dataflowmm.models.tiny import TINY_MODELS, build_tiny_models, default_models_dir
from dataflowmm.scaffold import init_project, load_pipeline_module

# The demo runs each scaffolded pipeline with --tiny, in this order.
DEMO_PIPELINES = [
    ("text_to_image_generation_pipeline.py", "text_to_image"),
    ("image_captioning_pipeline.py", "image_captioning"),
    ("image_augmentation_pipeline.py", "image_augmentation"),
    ("image_difference_caption_pipeline.py", "image_difference"),
]


@click.group()
@click.version_option(package_name="dataflowmm")
def main() -> None:
    """Synthesise and curate image-text training data with storage-stepped pipelines."""


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
    _quiet_model_libraries()
    out.mkdir(parents=True, exist_ok=True)
    init_project(out, force=True)
    for script, name in DEMO_PIPELINES:
        click.echo(f"== {script} --tiny")
        module = load_pipeline_module(out / "gpu_pipelines" / script)
        summaries = module.main(["--tiny", "--cache-path", str(out / "cache_local" / name)])
        for summary in summaries if isinstance(summaries, list) else [summaries]:
            _show_output(summary.output_path)
    click.echo(f"demo finished: outputs under {out.resolve() / 'cache_local'}")


def _quiet_model_libraries() -> None:
    """The demo's output is our step lines: silence the libraries' load bars and notices."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


def _show_output(output_path: str, rows_shown: int = 2) -> None:
    rows = [json.loads(line) for line in open(output_path, encoding="utf-8")]
    click.echo(f"   {len(rows)} rows in {output_path}")
    for row in rows[:rows_shown]:
        click.echo("   " + json.dumps(row, ensure_ascii=False)[:300])


@main.group()
def models() -> None:
    """Tiny random-weight models for offline use."""


@models.command("tiny")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True, type=click.Choice(list(TINY_MODELS)),
              help="build only these (repeatable); default: all")
def models_tiny(directory: Path | None, names: tuple[str, ...]) -> None:
    """Build tiny models into DIRECTORY (default: $DATAFLOWMM_MODELS_DIR or ~/.cache/dataflowmm/models)."""
    built = build_tiny_models(directory or default_models_dir(), list(names) or None)
    for name, path in built.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        click.echo(f"{name:30s} {size / 1e6:6.1f} MB  {path}")


@models.command("list")
def models_list() -> None:
    """Names of the tiny models that can be built."""
    for name in TINY_MODELS:
        click.echo(name)
