"""Files and folders a step removes from its own images folder (never from a user's `save_dir`)."""

from __future__ import annotations

from pathlib import Path


def remove_stale_temp_files(save_dir: Path, images_dir: Path) -> None:
    """Temp files of images a killed run was writing, in the step's own images folder.

    A process killed mid-write (the driver, or actors dying with it) cannot remove its
    temp file; the rerun writes the image again under its real name. Never done in a
    user's `save_dir`, which other runs may share.
    """
    if save_dir != images_dir.resolve():
        return
    for temp in save_dir.glob(".*.tmp"):
        temp.unlink(missing_ok=True)


def remove_empty_folders(folder: Path) -> None:
    """`folder` and the folders below it that hold no file."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()
