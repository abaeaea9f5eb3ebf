"""`dataflowmm gallery`: one HTML page per step; parsed here, and screenshotted in headless
Chromium when one is installed."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dataflowmm.cli import main
from dataflowmm.gallery import build_gallery
from dataflowmm.io.images import image_to_str

INJECTION = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


class Page(HTMLParser):
    """The page's title, its script elements and the rows JSON."""

    def __init__(self, text: str):
        super().__init__()
        self.title = ""
        self.scripts: list[tuple[dict, str]] = []
        self._in: str | None = None
        self._attrs: dict = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag in ("title", "script"):
            self._in, self._attrs = tag, dict(attrs)
            if tag == "script":
                self.scripts.append((self._attrs, ""))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    @property
    def rows(self) -> list[dict]:
        return json.loads(next(text for attrs, text in self.scripts if attrs.get("id") == "rows"))


@pytest.fixture
def step_file(tmp_path) -> Path:
    folder = tmp_path / "cache" / "step1_images"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (400, 300), (index * 80, 10, 200)).save(folder / f"r{index}.png")
    rows = [
        {"prompt": "a red cat", "image": "step1_images/r0.png", "clip_score": 0.31, "error": None},
        {"prompt": INJECTION, "image": "step1_images/r1.png", "clip_score": 0.12, "error": None},
        {"prompt": "a boat", "caption": "a small boat", "images": ["step1_images/r2.png", "step1_images/r0.png"],
         "inline": image_to_str(Image.new("RGB", (20, 20), "green")), "error": None},
        {"prompt": "broken", "image": None, "error": "ImageGeneration: HTTP 500 (after 4 retries)"},
    ]
    path = tmp_path / "cache" / "step1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def decode_thumbnail(src: str) -> Image.Image:
    assert src.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2])))


def test_the_page_holds_every_row_with_images_text_scores_and_errors(tmp_path, step_file):
    result = CliRunner().invoke(main, ["gallery", str(step_file), "-o", str(tmp_path / "g.html")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"gallery: {(tmp_path / 'g.html').resolve()}"
    page = Page((tmp_path / "g.html").read_text())
    rows = page.rows
    assert [row["i"] for row in rows] == [0, 1, 2, 3]
    assert [image["column"] for image in rows[2]["images"]] == ["images", "images", "inline"]
    thumbnail = decode_thumbnail(rows[0]["images"][0]["src"])
    assert max(thumbnail.size) == 192 and thumbnail.size == (192, 144)
    assert rows[0]["texts"] == [["prompt", "a red cat"]] and rows[0]["scores"] == [["clip_score", 0.31]]
    assert rows[2]["texts"] == [["prompt", "a boat"], ["caption", "a small boat"]]
    assert [row["error"] for row in rows] == [None, None, None, "ImageGeneration: HTTP 500 (after 4 retries)"]
    assert rows[3]["images"] == []


def test_rows_the_step_dropped_follow_the_kept_ones_with_their_reason(tmp_path, step_file):
    dropped = {"prompt": "a blurry dog", "image": "step1_images/r2.png", "clip_score": 0.05, "error": None,
               "dropped_by": "ClipScoreFilter: clip_score 0.05 < min_score 0.2"}
    step_file.with_name("step1.dropped.jsonl").write_text(json.dumps(dropped) + "\n")
    text = build_gallery(step_file, tmp_path / "g.html").read_text()
    rows = Page(text).rows
    assert [row["i"] for row in rows] == [0, 1, 2, 3, "dropped 0"]
    assert [row["dropped"] for row in rows] == [None] * 4 + [dropped["dropped_by"]]
    assert rows[4]["images"][0]["src"].startswith("data:image/jpeg") and rows[4]["scores"] == [["clip_score", 0.05]]
    assert "4 rows, 1 with errors, and 1 rows the step dropped" in text and 'id="only-dropped"' in text
    assert [row["i"] for row in Page(build_gallery(step_file, tmp_path / "h.html", dropped=False).read_text()).rows] == [
        0, 1, 2, 3]


def test_text_from_rows_cannot_run(tmp_path, step_file):
    out = build_gallery(step_file, tmp_path / "g.html", title="<script>alert('title')</script>")
    text = out.read_text()
    page = Page(text)
    assert text.lower().count("<script") == 2  # the rows JSON and the page's own script
    assert "<img src=x" not in text and "&lt;script&gt;alert(" in text
    assert page.title == "<script>alert('title')</script>"  # shown as text
    assert page.rows[1]["texts"] == [["prompt", INJECTION]]  # the data itself is intact
    script = page.scripts[1][1]
    assert "innerHTML" not in script and "textContent = text" in script


def test_linked_images_resolve_relative_to_the_page(tmp_path, step_file):
    out = tmp_path / "site" / "nested" / "g.html"
    result = CliRunner().invoke(main, ["gallery", str(step_file), "-o", str(out), "--link"])
    assert result.exit_code == 0, result.output
    rows = Page(out.read_text()).rows
    src = rows[0]["images"][0]["src"]
    assert not src.startswith(("data:", "/")) and (out.parent / urllib.parse.unquote(src)).resolve() == \
           (step_file.parent / "step1_images" / "r0.png").resolve()
    assert rows[2]["images"][2]["src"].startswith("data:image/jpeg")  # images inside rows are embedded


def test_a_missing_image_is_shown_not_fatal(tmp_path, step_file):
    (step_file.parent / "step1_images" / "r1.png").unlink()
    rows = Page(build_gallery(step_file, tmp_path / "g.html").read_text()).rows
    assert "image not found" in rows[1]["images"][0]["missing"]


def test_ten_thousand_rows_make_one_paged_page(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}", "score": i / 10, "error": None if i % 7 else "bad"})
                            + "\n" for i in range(10_000)))
    out = build_gallery(path, tmp_path / "big.html", page_size=50)
    text = out.read_text()
    assert len(Page(text).rows) == 10_000 and "const pageSize = 50;" in text
    assert len(text) < 5_000_000
    assert "10000 rows, 1429 with errors" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    found = sorted(glob.glob(os.path.expanduser("~/.cache/ms-playwright/chromium-*/chrome-linux*/chrome")))
    return found[-1] if found else None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed (see README, Development)")
def test_headless_chromium_renders_a_page_of_cards_and_runs_no_row_text(tmp_path, step_file):
    out = build_gallery(step_file, tmp_path / "g.html", page_size=3)
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*command, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert dom.count('class="card') == 3 and "page 1 of 2" in dom
    assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]
    errors_only = subprocess.run([*command, "--dump-dom", out.as_uri() + "#errors"],
                                 capture_output=True, text=True, timeout=60).stdout
    assert errors_only.count('class="card') == 1 and "HTTP 500 (after 4 retries)" in errors_only
    searched = subprocess.run([*command, "--dump-dom", out.as_uri() + "#q=BOAT"],
                              capture_output=True, text=True, timeout=60).stdout
    assert searched.count('class="card') == 1 and "a small boat" in searched
    shot = tmp_path / "shot.png"
    subprocess.run([*command, f"--screenshot={shot}", "--window-size=1200,900", out.as_uri()],
                   capture_output=True, timeout=60)
    with Image.open(shot) as image:
        assert image.size == (1200, 900) and len(image.convert("RGB").getcolors(1 << 20) or []) > 10
