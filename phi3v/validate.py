"""Every sample checked before the first training step, and ``python -m phi3v.validate``.

For each row of the training and evaluation splits:
- the row's schema (hub columns, or the jsonl line: UTF-8, JSON, keys, image paths inside the image folder),
- every conversation the row can become (DocVQA: one per reference answer): text fields, no empty answer,
  no control token of the chat format written out in the text (``<|end|>``, ``<|user|>``, ``<s>``, an
  image tag, ...: the tokenizer would read it as the token), image tags that match the images,
- every image decoded once (missing, empty, truncated, corrupt, not an image, over PIL's
  decompression-bomb limit, too elongated for the HD transform); its size gives its token count,
- the sample's length in tokens, against --max_length (image tokens are never cut, so a longer
  sample is dropped or stops the run).

Images are decoded in parallel worker processes with a progress bar; under torchrun every rank checks
a strided share and the results are gathered, so nothing is decoded twice. The result is cached under
``$PHI3V_CACHE`` (default ``~/.cache/phi3v``) by data fingerprint (``RowSource.fingerprint``: it changes
with the data), prompt builder, tokenizer and crop settings: a resumed or repeated run on the same data
reuses it. Problems stop the run, naming the row or file:line and the fix, unless --skip_bad_samples
drops them (counted, and listed in ``skipped_samples.jsonl``, also when nothing is left).

    python -m phi3v.validate finetune_hf_trainer_ucf101.py --data_dir ./ucf101 [any data flags of that script]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import PartialState
from PIL import Image
from tqdm import tqdm

from .checkpoints import SKIPPED_SAMPLES
from .console import available_cpus
from .data import IGNORE_INDEX, Conversation, as_candidates, control_tokens_in, conversation_ids
from .distributed import decided_on_main, gathered, is_distributed
from .errors import RecipeError
from .images import BadImageError, image_label, load_image
from .processing import IMAGE_TAG
from .sources import RowSource

if TYPE_CHECKING:
    from .args import RecipeArguments
    from .recipe import Task

logger = logging.getLogger(__name__)

VALIDATION_VERSION = 2  # bump when the checks change, so cached results are not reused
CHUNK_SIZE = 32  # rows a worker takes at a time
MAX_SHOWN = 20  # problems quoted in an error message


@dataclass
class SampleCheck:
    row: int  # the row of the source (dataset[row], or the jsonl line's index)
    tokens: int = 0  # longest sequence the row can become (training: prompt and answer), 0 if unreadable
    supervised: int = 0  # fewest supervised tokens among what the row can become (training)
    images: int = 0  # images decoded
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckedData:
    """The rows that passed, per split, and what was dropped with --skip_bad_samples."""

    train_rows: list[int]
    eval_rows: list[int]
    skipped: list[dict[str, Any]]
    train_images_per_sample: float = 0.0
    train_lengths: list[int] = field(default_factory=list)  # tokens of each kept training row, in train_rows order


# --- one row ---------------------------------------------------------------------------------------------------


def check_row(source: RowSource, row: int, build: Callable, processor, for_training: bool) -> SampleCheck:
    """Everything that can be known about one row before training, without raising."""
    check = SampleCheck(row)
    try:
        item = source.rows[row]
        check.problems = list(source.schema_problems(item))  # a copy: problems are added to it below
        if check.problems:
            return check
        built = build(item)
    except Exception as error:  # a row the recipe's builder cannot read: report it, whatever it is
        check.problems = [f"cannot be read as a sample ({type(error).__name__}: {error})"]
        return check
    candidates = as_candidates(built)
    image_tokens = _check_images(candidates, processor, check)
    if check.problems:
        return check
    supervised = []
    for candidate in candidates:
        problems = _text_problems(candidate, for_training, processor.tokenizer)
        if not problems:
            counts = [[image_tokens[id(ref)] for ref in turn.images] for turn in candidate.turns]
            try:
                input_ids, labels = conversation_ids(processor, candidate, counts, for_training)
                check.tokens = max(check.tokens, len(input_ids))
                supervised.append(sum(label != IGNORE_INDEX for label in labels))
            except ValueError as error:  # image tags in the text that do not match the images
                problems.append(str(error))
        check.problems += [p for p in problems if p not in check.problems]
    check.supervised = min(supervised, default=0)
    return check


def _check_images(candidates: list[Conversation], processor, check: SampleCheck) -> dict[int, int]:
    """Decode each distinct image of the row once; returns its token count by id(ref)."""
    tokens: dict[int, int] = {}
    for candidate in candidates:
        refs = [ref for turn in candidate.turns for ref in turn.images]
        for number, ref in enumerate(refs, start=1):
            if id(ref) in tokens:
                continue
            tokens[id(ref)] = 0
            try:
                width, height = load_image(ref).size
                check.images += 1
                tokens[id(ref)] = processor.image_processor.num_tokens_for_size(width, height)
            except (BadImageError, ValueError) as error:
                check.problems.append(f"{image_label(number, ref)}: {error}")
    return tokens


def _text_problems(conversation: Conversation, for_training: bool, tokenizer) -> list[str]:
    problems = []
    for number, turn in enumerate(conversation.turns, start=1):
        if not isinstance(turn.user, str) or not isinstance(turn.assistant, str):
            problems.append(f"turn {number}: the question and the answer must be text")
            continue
        if for_training and not turn.assistant.strip():
            problems.append(f"turn {number}: empty answer (nothing to learn): fill it in or drop the sample")
        tokenized = {"question": turn.user}
        if for_training or number < len(conversation.turns):  # an evaluation's last answer is its reference
            tokenized["answer"] = turn.assistant
        for role, text in tokenized.items():
            for token in control_tokens_in(text, tokenizer):
                problems.append(_control_token_problem(number, role, token))
    references = conversation.references()
    if not for_training and not any(isinstance(a, str) and a.strip() for a in references):
        problems.append("no non-empty reference answer to score against")
    return problems


def _control_token_problem(turn: int, role: str, token: str) -> str:
    if IMAGE_TAG.fullmatch(token):
        return (f"turn {turn}: the {role} holds the image tag {token}; image tags are added from the turn's "
                "images: remove it from the text")  # fmt: skip
    return (f"turn {turn}: the {role} holds {token}, which the tokenizer reads as the chat format's control "
            "token, not as text: remove it from the text, or drop the sample")  # fmt: skip


# --- many rows, in parallel -----------------------------------------------------------------------------------

_JOB: tuple | None = None  # (source, build, processor, for_training), inherited by forked workers


def _start_worker(job: tuple) -> None:
    global _JOB
    _JOB = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker process


def _check_chunk(rows: list[int]) -> list[SampleCheck]:
    source, build, processor, for_training = _JOB
    return [check_row(source, row, build, processor, for_training) for row in rows]


def check_rows(
    source: RowSource,
    rows: Sequence[int],
    build: Callable,
    processor,
    for_training: bool,
    workers: int,
    description: str,
    show_progress: bool = True,
) -> list[SampleCheck]:
    """check_row over ``rows`` with ``workers`` processes (forked, so they share the loaded data)."""
    chunks = [list(rows[i : i + CHUNK_SIZE]) for i in range(0, len(rows), CHUNK_SIZE)]
    job = (source, build, processor, for_training)
    results: list[SampleCheck] = []
    with tqdm(total=len(rows), desc=description, unit="sample", disable=not show_progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            _start_worker(job)
            batches = map(_check_chunk, chunks)
            for batch in batches:
                results += batch
                bar.update(len(batch))
            return results
        with multiprocessing.get_context("fork").Pool(workers, _start_worker, (job,)) as pool:
            for batch in pool.imap(_check_chunk, chunks):
                results += batch
                bar.update(len(batch))
    return results


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
    task: Task,
    args: RecipeArguments,
    processor,
    train: RowSource,
    held_out: RowSource,
    listing: Path | None = None,
    resumed: bool = False,
) -> CheckedData:
    """Check both splits; stop with every problem listed, or drop the bad rows with --skip_bad_samples and
    list them in ``listing`` (skipped_samples.jsonl; None: not written), also when nothing is left."""
    show = not args.no_tqdm
    train_checks = validate_split("training", train, task.train_conversation, processor, True, None, show)
    eval_checks = validate_split("evaluation", held_out, task.eval_conversation, processor, False, None, show)
    if args.max_length is not None:
        for check in train_checks:
            if check.tokens > args.max_length:
                check.problems = check.problems + [
                    f"{check.tokens} tokens, over --max_length {args.max_length} (image tokens are never cut): "
                    f"raise --max_length, lower --num_crops, or drop the sample"
                ]
    _log_lengths(train_checks)
    bad = [
        (split, source, c)
        for split, source, checks in (("train", train, train_checks), ("eval", held_out, eval_checks))
        for c in checks
        if c.problems
    ]
    if bad and not args.skip_bad_samples:
        raise RecipeError(_problems_message(bad))
    if bad:
        logger.warning(
            "--skip_bad_samples: dropping %d bad sample(s) (%d training, %d evaluation), listed in %s",
            len(bad),
            sum(split == "train" for split, _, _ in bad),
            sum(split == "eval" for split, _, _ in bad),
            Path(args.output_dir) / SKIPPED_SAMPLES,
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


def main(argv: list[str] | None = None) -> int:
    """``python -m phi3v.validate SCRIPT [flags]``: the script's data checks, without training."""
    from .args import parse_args
    from .recipe import load_processor, load_task, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    task = load_task(argv[0])
    args = parse_args(task.arguments, argv[1:])
    setup_logging(is_main_process=True)
    try:
        processor = load_processor(args)
        train, held_out = task.load_splits(args)
        checked = validate_recipe_data(
            task, args, processor, train, held_out.select(held_out.indices[: args.max_eval_samples])
        )
    except (RecipeError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for entry in checked.skipped:
        print(f"would skip {entry['where']}: {'; '.join(entry['problems'])}")
    print(
        f"OK: {len(checked.train_rows)} training and {len(checked.eval_rows)} evaluation samples pass"
        + (f", {len(checked.skipped)} would be skipped" if checked.skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
