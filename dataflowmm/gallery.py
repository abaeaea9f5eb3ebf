"""One self-contained HTML page to look at a step's rows: images, text, scores, errors.

Images are embedded as small thumbnails (data URIs) by default, so the page is one file
you can move or mail; `embed=False` links the image files relative to the page instead
(a lighter page for very large steps, valid while the files stay where they are). Rows
travel as JSON inside the page and a small script shows them a page at a time, with an
"only errors" filter, an "only dropped" filter and a text search; everything from rows is inserted as text, never
as HTML, so a prompt holding `<script>` is shown, not run. A link opens a filtered view:
`gallery.html#errors`, `gallery.html#dropped`, `gallery.html#q=boat`. Rows a filter step dropped
and kept aside (`{step}.dropped.jsonl`, `keep_dropped=True`) follow the kept rows, marked
with the reason. Only image files are shown or linked: a
value that is not an allowed image format (`dataflowmm.io.images.open_image`; links: its
header) shows as a missing image with the reason, its bytes never in the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from PIL import Image

from dataflowmm.execution.protocol import DROPPED_KEY, ERROR_KEY
from dataflowmm.io.atomic import atomic_file
from dataflowmm.io.images import (
    ImageReadError,
    check_image_file,
    image_from_str,
    load_image,
    looks_like_base64_image,
)
from dataflowmm.io.records import iter_records

TEXT_KEYS = ("prompt", "caption", "text", "instruction", "question", "answer", "response")


def _thumbnail(image: Image.Image, size: int) -> str:
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _ImageSources:
    """`src` values for a row's images: thumbnails, or links relative to the page."""

    def __init__(self, image_columns: list[str], data_dir: Path, page_dir: Path, embed: bool, size: int):
        self.image_columns = image_columns
        self.data_dir = data_dir
        self.page_dir = page_dir
        self.embed = embed
        self.size = size

    def of(self, row: dict) -> list[dict]:
        sources = []
        for column in self.image_columns:
            values = row.get(column)
            for value in values if isinstance(values, list) else [values]:
                if value:
                    sources.append({"column": column, **self._source(value)})
        return sources

    def _source(self, value: str) -> dict:
        try:
            if looks_like_base64_image(value):
                return {"src": _thumbnail(image_from_str(value), self.size)}
            path = self.data_dir / os.path.expanduser(value)
            if not self.embed:
                check_image_file(path)  # only image files are linked: a header check
                return {"src": urllib.parse.quote(os.path.relpath(path, self.page_dir))}
            return {"src": _thumbnail(load_image(path), self.size)}
        except ImageReadError as error:
            return {"missing": str(error)}


def _fields(row: dict, image_columns: list[str]) -> tuple[list[list[str]], list[list[Any]], list[list[str]]]:
    """(text fields, scores, other fields) of a row, each as [key, value] pairs."""
    texts, scores, others = [], [], []
    for key, value in row.items():
        if key in image_columns or key in (ERROR_KEY, DROPPED_KEY) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            others.append([key, json.dumps(value, ensure_ascii=False)[:500]])
        elif key.endswith(("_path", "_paths")):  # file names: small print
            others.append([key, value])
        elif isinstance(value, (int, float)):
            scores.append([key, value])
        else:
            texts.append([key, value])
    texts.sort(key=lambda pair: (pair[0] not in TEXT_KEYS, TEXT_KEYS.index(pair[0]) if pair[0] in TEXT_KEYS else 0))
    return texts, scores, others


def _safe_json(value: Any) -> str:
    """JSON that cannot end its <script> element early: <, > and & written as escapes."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_gallery(
    step_file: str | os.PathLike,
    out: str | os.PathLike = "gallery.html",
    *,
    image_columns: list[str] | None = None,
    embed: bool = True,
    thumbnail_size: int = 192,
    page_size: int = 48,
    title: str | None = None,
    dropped: bool = True,
) -> Path:
    """Write the gallery page of a step's cache file; returns its path.

    Args:
        step_file: the step's cache file (jsonl, json, csv or parquet).
        out: the HTML file to write.
        image_columns: columns holding images; detected from the values when `None`
            (paths with an image extension, base64 images, lists of them).
        embed: embed thumbnails in the page (default); `False` links the files relative to the page.
        thumbnail_size: longest side of embedded thumbnails, in pixels.
        page_size: rows shown per page.
        title: the page's title (default: the step file's name).
        dropped: show the rows the step dropped, when it kept them aside (`{step}.dropped.jsonl`).
    """
    from dataflowmm.export.training_rows import detect_image_columns

    step_file, out = Path(step_file), Path(out)
    rows = list(iter_records(step_file))
    dropped_file = step_file.with_name(f"{step_file.stem}.dropped.jsonl")
    dropped_rows = list(iter_records(dropped_file)) if dropped and dropped_file.is_file() else []
    columns = detect_image_columns(rows) if image_columns is None else list(image_columns)
    sources = _ImageSources(columns, step_file.resolve().parent, out.resolve().parent, embed, thumbnail_size)
    data = []
    for index, row in enumerate(rows + dropped_rows):
        texts, scores, others = _fields(row, columns)
        data.append({"i": index if index < len(rows) else f"dropped {index - len(rows)}",
                     "images": sources.of(row), "texts": texts, "scores": scores, "others": others,
                     "error": row.get(ERROR_KEY), "dropped": row.get(DROPPED_KEY)})
    errors = sum(1 for item in data if item["error"] is not None)
    heading = title or step_file.name
    summary = f"{len(rows)} rows, {errors} with errors"
    if dropped_rows:
        summary += f", and {len(dropped_rows)} rows the step dropped"
    values = {"TITLE": html.escape(heading),
              "SUMMARY": html.escape(f"{summary} — {step_file}"),
              "PAGE_SIZE": str(int(page_size)), "ROWS": _safe_json(data)}
    # One pass, so text from the data can never be taken for another placeholder.
    page = re.sub(r"%(TITLE|SUMMARY|PAGE_SIZE|ROWS)%", lambda match: values[match.group(1)], _PAGE)
    with atomic_file(out) as file:
        file.write(page.encode("utf-8"))
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
header { position: sticky; top: 0; background: #fafafa; padding-bottom: .5em; border-bottom: 1px solid #ddd; }
.controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1em; margin-top: 1em; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: .6em; overflow-wrap: anywhere; }
.card.failed { border: 2px solid #c0392b; background: #fdecea; }
.card.dropped { border: 2px dashed #888; background: #f0f0f0; }
.dropped-by { color: #555; font-weight: 600; margin: .3em 0; }
.images { display: flex; flex-wrap: wrap; gap: 4px; }
.images img { width: 112px; max-width: 100%; height: auto; border-radius: 3px; }
.error { color: #c0392b; font-weight: 600; margin: .3em 0; }
.key { color: #777; font-size: .85em; }
.score { display: inline-block; background: #eef; border-radius: 3px; padding: 0 .3em; margin: .1em; font-size: .85em; }
.other { color: #555; font-size: .8em; }
.missing { color: #c0392b; font-size: .8em; }
</style>
</head>
<body>
<header>
<h1>%TITLE%</h1>
<p>%SUMMARY%</p>
<div class="controls">
<label><input type="checkbox" id="only-errors"> only errors</label>
<label><input type="checkbox" id="only-dropped"> only dropped</label>
<input type="search" id="search" placeholder="search text" size="30">
<button id="prev">&larr; previous</button><span id="page-info"></span><button id="next">next &rarr;</button>
</div>
</header>
<main id="grid"></main>
<script type="application/json" id="rows">%ROWS%</script>
<script>
(function () {
  "use strict";
  const rows = JSON.parse(document.getElementById("rows").textContent);
  const pageSize = %PAGE_SIZE%;
  const grid = document.getElementById("grid");
  const onlyErrors = document.getElementById("only-errors");
  const onlyDropped = document.getElementById("only-dropped");
  const search = document.getElementById("search");
  const info = document.getElementById("page-info");
  let page = 0;
  let shown = rows;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;  // text, never HTML
    return node;
  }

  function card(row) {
    const node = element("article", row.error !== null ? "card failed" : row.dropped ? "card dropped" : "card");
    node.dataset.row = row.i;
    node.appendChild(element("div", "key", "row " + row.i));
    const images = element("div", "images");
    for (const image of row.images) {
      if (image.missing) { images.appendChild(element("span", "missing", image.missing)); continue; }
      const img = element("img");
      img.loading = "lazy";
      img.alt = image.column;
      img.src = image.src;
      images.appendChild(img);
    }
    node.appendChild(images);
    if (row.error !== null) node.appendChild(element("div", "error", row.error));
    if (row.dropped) node.appendChild(element("div", "dropped-by", "dropped: " + row.dropped));
    for (const [key, value] of row.texts) {
      const p = element("p");
      p.appendChild(element("span", "key", key + ": "));
      p.appendChild(document.createTextNode(value));
      node.appendChild(p);
    }
    const scores = element("div");
    for (const [key, value] of row.scores) scores.appendChild(element("span", "score", key + " " + value));
    node.appendChild(scores);
    for (const [key, value] of row.others) node.appendChild(element("div", "other", key + ": " + value));
    return node;
  }

  function matches(row, needle) {
    if (onlyErrors.checked && row.error === null) return false;
    if (onlyDropped.checked && !row.dropped) return false;
    if (!needle) return true;
    const haystack = row.texts.map(pair => pair[1]).concat(row.error || "").join("\\n").toLowerCase();
    return haystack.includes(needle);
  }

  function render() {
    const pages = Math.max(1, Math.ceil(shown.length / pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    grid.replaceChildren(...shown.slice(page * pageSize, (page + 1) * pageSize).map(card));
    info.textContent = " page " + (page + 1) + " of " + pages + " (" + shown.length + " rows) ";
  }

  function filter() {
    const needle = search.value.trim().toLowerCase();
    shown = rows.filter(row => matches(row, needle));
    page = 0;
    render();
  }

  onlyErrors.addEventListener("change", filter);
  onlyDropped.addEventListener("change", filter);
  search.addEventListener("input", filter);
  document.getElementById("prev").addEventListener("click", () => { page -= 1; render(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; render(); });
  // A link can open a filtered view: gallery.html#errors, gallery.html#dropped, gallery.html#errors&q=cat
  const start = new URLSearchParams(location.hash.slice(1));
  onlyErrors.checked = start.has("errors");
  onlyDropped.checked = start.has("dropped");
  search.value = start.get("q") || "";
  filter();
})();
</script>
</body>
</html>
"""
