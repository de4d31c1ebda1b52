"""Every sample checked before the first training step (the checks themselves: ``phi3v.data.checks``).

Images are decoded in parallel worker processes with a progress bar; under torchrun every rank checks
a strided share and the results are gathered, so nothing is decoded twice. The result is cached under
``$PHI3V_CACHE`` (default ``~/.cache/phi3v``) by data fingerprint (``RowSource.fingerprint``: it changes
with the data), prompt builder, tokenizer and crop settings: a resumed or repeated run on the same data
reuses it. Problems stop the run, naming the row or file:line and the fix, unless --skip_bad_samples
drops them (counted, and listed in ``skipped_samples.jsonl``, also when nothing is left), and
--max_length stops or drops a sample that is longer (image tokens are never cut).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import PartialState
from PIL import Image

from ..console import available_cpus
from ..distributed import decided_on_main, gathered, is_distributed
from ..errors import RecipeError
from .checks import SampleCheck, check_rows
from .sources import RowSource

logger = logging.getLogger(__name__)

VALIDATION_VERSION = 2  # bump when the checks change, so cached results are not reused
MAX_SHOWN = 20  # problems quoted in an error message
SKIPPED_SAMPLES = "skipped_samples.jsonl"  # in --output_dir: what --skip_bad_samples dropped, and why


@dataclass
class CheckedData:
    """The rows that passed, per split, and what was dropped with --skip_bad_samples."""

    train_rows: list[int]
    eval_rows: list[int]
    skipped: list[dict[str, Any]]
    train_images_per_sample: float = 0.0
    train_lengths: list[int] = field(default_factory=list)  # tokens of each kept training row, in train_rows order


# --- one row ---------------------------------------------------------------------------------------------------


# --- many rows, in parallel -----------------------------------------------------------------------------------


# --- a split, cached and shared between ranks -----------------------------------------------------------------


def default_workers() -> int:
    """This rank's share of the CPUs it may run on."""
    cpus = available_cpus()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // local_ranks)


def cache_dir() -> Path:
    return Path(os.environ.get("PHI3V_CACHE", Path.home() / ".cache" / "phi3v")) / "validation"


def cache_key(source: RowSource, build: Callable, processor, for_training: bool) -> str:
    """Changes whenever the result could: the data, the rows used, the prompt builder, tokenizer, crops."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:  # the builder's whole module: it may call helpers defined beside it
        builder = f"{build.__qualname__}\n{inspect.getsource(inspect.getmodule(build))}"
    except (AttributeError, OSError, TypeError):
        builder = f"{getattr(build, '__module__', '')}.{getattr(build, '__qualname__', repr(build))}"
    image_processor = processor.image_processor
    parts = [
        VALIDATION_VERSION,
        for_training,
        source.fingerprint,
        hashlib.sha256(json.dumps(source.indices).encode()).hexdigest(),
        builder,
        backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
        tokenizer.chat_template,
        image_processor.num_crops,
        image_processor.crop_size,
        image_processor.num_img_tokens,
        Image.MAX_IMAGE_PIXELS,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _load_cached(key: str) -> list[SampleCheck] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return [SampleCheck(**entry) for entry in json.loads(path.read_text())["checks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_cached(key: str, checks: list[SampleCheck]) -> None:
    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        partial.write_text(json.dumps({"checks": [asdict(c) for c in checks]}))
        partial.replace(path)  # atomic: a reader sees the whole file or none
    except OSError as error:
        logger.warning("Could not cache the validation result in %s (%s); the next run checks again.", path, error)


def validate_split(
    name: str,
    source: RowSource,
    build: Callable,
    processor,
    for_training: bool,
    workers: int | None = None,
    show_progress: bool = True,
) -> list[SampleCheck]:
    """One SampleCheck per row of ``source.indices`` (in that order), from the cache or computed now."""
    state = PartialState()
    key = cache_key(source, build, processor, for_training)
    checks = decided_on_main(partial(_load_cached, key))
    if checks is not None:
        logger.info("%s data: %d samples already validated (cached result %s reused)", name, len(checks), key)
        return checks
    started = time.monotonic()
    share = source.indices[state.process_index :: state.num_processes]
    description = f"Validating {name} data" + (
        f" (rank 0's share of {len(source.indices)})" if is_distributed() else ""
    )
    mine = check_rows(
        source,
        share,
        build,
        processor,
        for_training,
        workers or default_workers(),
        description,
        show_progress and state.is_main_process,
    )
    position = {row: i for i, row in enumerate(source.indices)}
    checks = sorted(gathered(mine), key=lambda check: position[check.row])
    seconds = time.monotonic() - started
    images = sum(check.images for check in checks)
    logger.info(
        "%s data: %d samples, %d images validated in %.1f s (%.0f images/s)",
        name,
        len(checks),
        images,
        seconds,
        images / max(seconds, 1e-9),
    )
    if state.is_main_process:
        _save_cached(key, checks)
    return checks


# --- the recipe's data ----------------------------------------------------------------------------------------


def validate_recipe_data(
    train: RowSource,
    held_out: RowSource,
    builders: tuple[Callable, Callable],
    processor,
    max_length: int | None = None,
    skip_bad_samples: bool = False,
    show_progress: bool = True,
    listing: Path | None = None,
    resumed: bool = False,
) -> CheckedData:
    """Check both splits, each row built by its split's builder (``builders``: training, evaluation); stop
    with every problem listed, or drop the bad rows with --skip_bad_samples and list them in ``listing``
    (skipped_samples.jsonl; None: not written), also when nothing is left."""
    train_build, eval_build = builders
    train_checks = validate_split("training", train, train_build, processor, True, None, show_progress)
    eval_checks = validate_split("evaluation", held_out, eval_build, processor, False, None, show_progress)
    if max_length is not None:
        for check in train_checks:
            if check.tokens > max_length:
                check.problems = check.problems + [
                    f"{check.tokens} tokens, over --max_length {max_length} (image tokens are never cut): "
                    f"raise --max_length, lower --num_crops, or drop the sample"
                ]
    _log_lengths(train_checks)
    bad = [
        (split, source, c)
        for split, source, checks in (("train", train, train_checks), ("eval", held_out, eval_checks))
        for c in checks
        if c.problems
    ]
    if bad and not skip_bad_samples:
        raise RecipeError(_problems_message(bad))
    if bad and listing is not None:
        logger.warning(
            "--skip_bad_samples: dropping %d bad sample(s) (%d training, %d evaluation), listed in %s",
            len(bad),
            sum(split == "train" for split, _, _ in bad),
            sum(split == "eval" for split, _, _ in bad),
            listing,
        )
    checked = CheckedData(
        [c.row for c in train_checks if not c.problems],
        [c.row for c in eval_checks if not c.problems],
        [
            {"split": split, "row": c.row, "where": source.where(c.row), "problems": c.problems}
            for split, source, c in bad
        ],
    )
    kept = [c for c in train_checks if not c.problems]
    checked.train_images_per_sample = sum(c.images for c in kept) / max(len(kept), 1)
    checked.train_lengths = [c.tokens for c in kept]
    if listing is not None:
        write_skipped(checked, listing, resumed)
    if not checked.train_rows or sum(c.supervised for c in kept) == 0:
        raise RecipeError(_nothing_left_message(f"No training sample with a supervised token is left in "
                                                f"{train.origin}: nothing to learn.", bad, listing))  # fmt: skip
    if not checked.eval_rows:
        raise RecipeError(_nothing_left_message(f"No evaluation sample is left in {held_out.origin}.", bad, listing))
    return checked


def _log_lengths(checks: list[SampleCheck]) -> None:
    lengths = sorted(c.tokens for c in checks if c.tokens)
    if lengths:
        logger.info(
            "Training samples: %s tokens on average, %s at the 95th percentile, %s at most",
            f"{sum(lengths) / len(lengths):,.0f}",
            f"{lengths[int(0.95 * (len(lengths) - 1))]:,}",
            f"{lengths[-1]:,}",
        )


def _problems_message(bad: list[tuple[str, RowSource, SampleCheck]]) -> str:
    return (
        f"{len(bad)} bad sample(s) found before training:\n  {_quoted(bad)}\n"
        "Fix them, or pass --skip_bad_samples to drop them (they are then counted in the log and listed in "
        "skipped_samples.jsonl in --output_dir)."
    )


def _nothing_left_message(what: str, bad: list[tuple[str, RowSource, SampleCheck]], listing: Path | None) -> str:
    if not bad:
        return what
    listed = f" (all of them are listed in {listing})" if listing is not None else ""
    return f"{what} {len(bad)} sample(s) were dropped{listed}, the first for:\n  {_quoted(bad)}"


def _quoted(bad: list[tuple[str, RowSource, SampleCheck]]) -> str:
    """The first MAX_SHOWN problems, one a line, each with its place."""
    lines = [f"{source.where(c.row)}: {problem}" for _, source, c in bad for problem in c.problems]
    more = f"\n  ... and {len(lines) - MAX_SHOWN} more" if len(lines) > MAX_SHOWN else ""
    return "\n  ".join(lines[:MAX_SHOWN]) + more


def write_skipped(checked: CheckedData, listing: Path, resumed: bool) -> None:
    """skipped_samples.jsonl: one line per sample dropped now (split, row, where, problems), and for a
    resumed run those its training skipped before (they carry their step); no file when there is none."""
    earlier = []
    if resumed and listing.is_file():
        earlier = [line for line in listing.read_text().splitlines() if line.strip() and "step" in json.loads(line)]
    lines = [json.dumps(entry) for entry in checked.skipped] + earlier
    if lines:
        listing.write_text("".join(line + "\n" for line in lines))
    else:
        listing.unlink(missing_ok=True)
