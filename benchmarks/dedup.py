"""What `ImageDeduplicator`'s final pass costs at 20k, 100k and 1M rows: the index vs the scan.

Synthetic checkpointed rows (what the batches leave: an image path and the `__image_dedup__`
fingerprint), one image each: random 64-bit pHashes or random unit 512-d CLIP embeddings,
with a planted 10 % of near copies of a random earlier row (pHash: 0-14 bits flipped, so
about three in four lie within the default distance 10; CLIP: cosine to the original drawn
from 0.93-1.0 around the default threshold 0.95) and 1 % same-pixel copies. Rows are written
to a jsonl file first, then each pass runs in a fresh process over that file (as the step
runs it: `final_pass(iter_records(...))`, rows read, fingerprints decoded, rows spilled and
read back), reporting its seconds and peak resident memory (`ru_maxrss`, the process
total, imports of torch and faiss included; `import_rss_mb=` is that baseline).

The scan (every row against every kept row, the final pass before the index) runs up to
`--scan-max-rows` (20,000 by default: 100,000 would take minutes for pHash, about an hour for
embeddings); verdicts are compared there (pHash, and CLIP's exact flat index up to 20,000
embeddings, must be identical). `recall_clip=` is the share of rows the exact search drops
that the inverted file (float16, used past 20,000 embeddings) also drops: at 20,000 rows
against the scan (the inverted file forced) and at 100,000 against the exact flat index
(forced), the lower of the two. At 1M (no exact search there), `recall_clip_planted_1m=`:
the share dropped of the planted copies with cosine >= 0.96 to an original that was kept
(each certainly dropped by exact search).

    .venv/bin/python benchmarks/dedup.py [--sizes 20000,100000,1000000] [--methods phash,clip]
        [--scan-max-rows 20000] [--skip-recall-100k]

Goals on the 2-core box (issue 30): a million pHash rows <= 120 s, a million embeddings
<= 600 s, peak memory <= 4 GB, recall >= 0.995.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

DIM = 512
NEAR_SHARE, SAME_PIXELS_SHARE = 0.10, 0.01
BLOCK = 20_000


def synthetic_rows(method: str, rows: int, planted: list, seed: int = 0):
    """Rows in blocks; (copy row, original row, cosine) of the planted near copies are
    appended to `planted`."""
    rng = np.random.default_rng(seed)
    copies = np.sort(rng.choice(np.arange(1, rows), int(NEAR_SHARE * rows), replace=False))
    originals = (rng.random(len(copies)) * copies).astype(np.int64)
    same = set(rng.choice(np.arange(1, rows), int(SAME_PIXELS_SHARE * rows), replace=False).tolist())
    source = dict(zip(copies.tolist(), originals.tolist(), strict=True))
    vectors: dict[int, np.ndarray] = {}  # originals still to be copied
    needed = set(originals.tolist())
    for start in range(0, rows, BLOCK):
        count = min(BLOCK, rows - start)
        if method == "phash":
            block = rng.integers(0, 2**63, count, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, count, dtype=np.uint64)
        else:
            block = rng.standard_normal((count, DIM), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out = []
        for offset in range(count):
            row = start + offset
            pixels = row
            if row in source:
                original = vectors[source[row]]
                if method == "phash":
                    flips = rng.choice(64, rng.integers(0, 15), replace=False)
                    block[offset] = original ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64), initial=np.uint64(0))
                else:
                    cosine = rng.uniform(0.93, 1.0)
                    noise = rng.standard_normal(DIM).astype(np.float32)
                    noise -= noise @ original * original
                    noise /= np.linalg.norm(noise)
                    block[offset] = cosine * original + np.sqrt(1 - cosine**2) * noise
                    planted.append((row, source[row], float(cosine)))
            elif row in same and row - 1 in vectors:
                block[offset], pixels = vectors[row - 1], row - 1
            if row in needed or row + 1 in same:
                vectors[row] = block[offset].copy()
            digest = hashlib.sha256(str(pixels).encode()).hexdigest()
            if method == "phash":
                fingerprint = {"hash": [digest], "perceptual": [np.array([block[offset]]).view(np.uint8).tobytes().hex()]}
            else:
                fingerprint = {"hash": [digest], "embedding": base64.b64encode(block[offset].astype("<f4").tobytes()).decode()}
            out.append({"id": row, "images": [f"img/{row}.jpg"], "error": None, "__image_dedup__": fingerprint})
        yield out


def write_rows(method: str, rows: int, path: Path) -> list:
    planted: list = []
    with open(path, "wb") as file:
        for block in synthetic_rows(method, rows, planted):
            file.write(b"".join(orjson.dumps(row) + b"\n" for row in block))
    return planted


def child(method: str, path: str, mode: str, dropped_path: str) -> None:
    """One pass in this (fresh) process; prints one JSON line."""
    from dataflowmm.contract import DROP_MARK
    from dataflowmm.io.records import iter_records
    from dataflowmm.operators import image_deduplicator
    from dataflowmm.operators.image_deduplicator import ImageDeduplicator, _Fingerprints

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "phash":
        op = ImageDeduplicator(method="phash")
    else:
        op = ImageDeduplicator("unused/clip", similarity_threshold=0.95)
        op.serving = None  # the final pass needs no model
    if mode in ("ivf", "exact"):  # where float16 (and so the inverted file) starts
        image_deduplicator.EXACT_MAX_VECTORS = 0 if mode == "ivf" else 10**9
    started = time.perf_counter()
    reasons: dict[int, str] = {}
    if mode == "scan":
        fingerprints = _Fingerprints(op.measure())
        for position, row in enumerate(iter_records(path)):
            fingerprints.add(position, row.pop("__image_dedup__"))
        reasons = op.find_repeats(fingerprints, scan=True)
    else:
        for position, row in enumerate(op.final_pass(iter_records(path))):
            if row.get(DROP_MARK) is not None:
                reasons[position] = row[DROP_MARK].split(": ", 1)[1]
    seconds = time.perf_counter() - started
    Path(dropped_path).write_text(json.dumps(reasons))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "import_rss_mb": import_rss, "dropped": len(reasons)}))


def run_child(method: str, path: Path, mode: str) -> tuple[dict, dict[str, str]]:
    dropped = path.with_suffix(f".{mode}.json")
    result = subprocess.run([sys.executable, __file__, "--child", method, str(path), mode, str(dropped)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{method} {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), json.loads(dropped.read_text())


def recall(reference: dict[str, str], found: dict[str, str]) -> float:
    return len(set(reference) & set(found)) / max(1, len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000,1000000")
    parser.add_argument("--methods", default="phash,clip")
    parser.add_argument("--scan-max-rows", type=int, default=20_000)
    parser.add_argument("--skip-recall-100k", action="store_true")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    figures: dict[str, str] = {}
    recalls: list[float] = []
    print(f"{'method':>6} | {'rows':>9} | {'contender':>10} | {'seconds':>8} | {'peak MB':>8} | {'dropped':>8} | verdicts")
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as folder:
        for method in args.methods.split(","):
            for rows in sizes:
                path = Path(folder) / f"{method}-{rows}.jsonl"
                planted = write_rows(method, rows, path)
                index, found = run_child(method, path, "index")
                note = ""
                if rows <= args.scan_max_rows:
                    scan, reference = run_child(method, path, "scan")
                    print(f"{method:>6} | {rows:>9} | {'scan':>10} | {scan['seconds']:>8.1f} | {scan['peak_rss_mb']:>8.0f} | "
                          f"{scan['dropped']:>8} |")
                    note = "identical to the scan" if found == reference else \
                        f"differ from the scan (recall {recall(reference, found):.4f})"
                    if method == "clip":
                        ivf, forced = run_child(method, path, "ivf")
                        recalls.append(recall(reference, forced))
                        print(f"{method:>6} | {rows:>9} | {'ivf forced':>10} | {ivf['seconds']:>8.1f} | "
                              f"{ivf['peak_rss_mb']:>8.0f} | {ivf['dropped']:>8} | recall vs scan {recalls[-1]:.4f}")
                elif method == "clip" and rows <= 100_000 and not args.skip_recall_100k:
                    exact, reference = run_child(method, path, "exact")
                    recalls.append(recall(reference, found))
                    print(f"{method:>6} | {rows:>9} | {'exact flat':>10} | {exact['seconds']:>8.1f} | "
                          f"{exact['peak_rss_mb']:>8.0f} | {exact['dropped']:>8} |")
                    note = f"recall vs exact flat {recalls[-1]:.4f}"
                if method == "clip" and rows > 100_000:
                    # A copy within 0.96 of an original that was kept is dropped by the exact search.
                    sure = [str(copy) for copy, original, cosine in planted if cosine >= 0.96 and str(original) not in found]
                    figures["recall_clip_planted_1m"] = f"{recall(dict.fromkeys(sure), found):.4f}"
                    note = f"planted copies (cosine >= 0.96) of kept originals dropped: {figures['recall_clip_planted_1m']}"
                print(f"{method:>6} | {rows:>9} | {'index':>10} | {index['seconds']:>8.1f} | {index['peak_rss_mb']:>8.0f} | "
                      f"{index['dropped']:>8} | {note}", flush=True)
                if rows == 1_000_000:
                    figures[f"seconds_1m_{method}"] = f"{index['seconds']:.1f}"
                    figures[f"peak_rss_mb_1m_{method}"] = f"{index['peak_rss_mb']:.0f}"
                figures["import_rss_mb"] = f"{index['import_rss_mb']:.0f}"
                path.unlink()
    if recalls:
        figures["recall_clip"] = f"{min(recalls):.4f}"
    for name, value in figures.items():
        print(f"{name}={value}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
