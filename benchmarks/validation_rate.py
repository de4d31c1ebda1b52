"""How fast the check before training goes through DocVQA-sized data (images decoded per second).

    .venv/bin/python benchmarks/validation_rate.py [--num_images 2000] [--workers N] [--processor DIR]

Writes a local copy of the DocVQA mini schema with ``--num_images`` distinct scanned-page-like JPEGs
(portrait pages of about 1700x2200 pixels with lines of dark "text", as DocVQA's scans are), then runs
the DocVQA recipe's training-data validation on it, uncached, with num_crops 16, and prints the rate and
what it means for the full DocVQA (39,463 training images). The processor is the official one from
``--processor``, or from $PHI3V_REFERENCE_DIR/phi35v_official when that is set (a folder with the official
config, processor and tokenizer files, as the tests take), otherwise a tiny checkpoint with the official
336-pixel crops.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from datasets import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.documents import scanned_page  # noqa: E402
from phi3v import Phi3VProcessor  # noqa: E402
from phi3v.data.sources import load_hub_source  # noqa: E402
from phi3v.data.synthetic import DOCVQA_MINI_FEATURES, _write_readme  # noqa: E402
from phi3v.data.validation import default_workers, validate_split  # noqa: E402
from phi3v.models.tiny import write_tiny_checkpoint  # noqa: E402
from phi3v.task import load_task  # noqa: E402

FULL_DOCVQA_IMAGES = 39_463
OFFICIAL = Path(os.environ.get("PHI3V_REFERENCE_DIR", "/nonexistent")) / "phi35v_official"


def page(seed: int) -> bytes:
    """A scanned page: off-white paper, a heading and rows of dark word blocks, saved as JPEG."""
    rng = random.Random(seed)
    image = scanned_page(rng.randint(1600, 1800), rng.randint(2100, 2300), rng)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def row(index: int) -> dict:
    return {
        "id": str(index),
        "image": {"bytes": page(index), "path": None},
        "query": {lang: "What is the date on the letter?" for lang in ("de", "en", "es", "fr", "it")},
        "answers": ["March 3, 1998", "3/3/98"],
        "words": [],
        "bounding_boxes": [],
        "answer": {"match_score": 1.0, "matched_text": "", "start": 0, "text": ""},
    }


def write_pages(folder: Path, count: int) -> None:
    with Pool() as pool:
        rows = pool.map(row, range(count), chunksize=16)
    for split in ("train", "test"):
        path = folder / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_list(rows if split == "train" else rows[:1], features=DOCVQA_MINI_FEATURES).to_parquet(str(path))
    _write_readme(folder, {"default": ["train", "test"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--processor", type=Path, default=OFFICIAL if OFFICIAL.is_dir() else None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="validation_rate_"))
    os.environ["PHI3V_CACHE"] = str(work / "cache")  # always measure the uncached check

    started = time.monotonic()
    write_pages(work / "docvqa", args.num_images)
    print(f"wrote {args.num_images} pages in {time.monotonic() - started:.0f} s to {work / 'docvqa'}")
    processor_dir = args.processor or write_tiny_checkpoint(work / "tiny", crop_size=336, num_crops=16)
    processor = Phi3VProcessor.from_pretrained(processor_dir, num_crops=16)
    source = load_hub_source(
        str(work / "docvqa"), None, "train", "--dataset_name_or_path", ["image", "query", "answers"]
    )
    task = load_task("docvqa")

    started = time.monotonic()
    checks = validate_split("training", source, task.train_conversation, processor, True, args.workers)
    seconds = time.monotonic() - started
    images = sum(check.images for check in checks)
    assert images == args.num_images and not any(check.problems for check in checks)
    rate = images / seconds
    tokens = sum(check.tokens for check in checks) / len(checks)
    print(f"processor: {processor_dir}")
    print(f"validated {images} images in {seconds:.1f} s with {args.workers} worker process(es): {rate:.0f} images/s")
    print(f"mean tokens per sample at num_crops 16: {tokens:,.0f}")
    print(f"full DocVQA ({FULL_DOCVQA_IMAGES:,} images) at this rate: {FULL_DOCVQA_IMAGES / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
