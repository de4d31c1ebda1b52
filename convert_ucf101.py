"""Turn the UCF-101 subset's videos into 8 frames each plus conversation jsonl files.

    python convert_ucf101.py --out_dir ./ucf101                    # downloads sayakpaul/ucf101-subset
    python convert_ucf101.py --video_dir DIR --out_dir ./ucf101    # DIR holds UCF101_subset/{train,val,test}

Output: out_dir/images/<split>/<Class>/<video>.<k>.jpg (k = 0..7) and out_dir/ucf101_<split>.jsonl, one
line per video: {"id": "<split>-<10-digit index>", "source": "ucf101", "conversations": [{"images":
[8 paths relative to images/], "user": "Classify the video into one of the following classes: ...",
"assistant": "<Class>"}]}. Videos are taken in sorted order (train, val, test), so ids are stable.

A clip that cannot be decoded, or has fewer than 8 frames, stops the conversion with its path; with
--skip_bad_videos it is left out instead, counted and listed. A split's jsonl file appears only once
the whole split is converted.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from phi3v.args import flag, parse_args
from phi3v.errors import RecipeError, command
from phi3v.hub import require_folder, require_local_or_reachable

SPLITS = ("train", "val", "test")
FRAMES_PER_VIDEO = 8


class BadVideoError(RecipeError):
    """A clip that cannot give FRAMES_PER_VIDEO frames."""


@dataclass
class ConvertArguments:
    video_dir: str | None = flag(None, "(new) local UCF101_subset (or its parent); skips the download")
    tmp_dir: str = flag("/tmp/ucf101", "download folder; must not exist (it is deleted afterwards)")
    out_dir: str = flag("./ucf101", "output folder")
    skip_bad_videos: bool = flag(False, "(new) leave out clips that cannot be used (counted and listed)")


def frame_indices(total_frames: int, count: int = FRAMES_PER_VIDEO) -> list[int]:
    """Evenly spaced from frame 0, as np.arange(0, T, T / 8) in the original; always exactly `count`
    (the original could yield 9 through float rounding, or fewer frames for clips under 8 frames)."""
    return np.arange(0, total_frames, total_frames / count).astype(int)[:count].tolist()


def read_frames(video: Path, count: int = FRAMES_PER_VIDEO) -> list[Image.Image]:
    """Decode the clip with PyAV from the start, keeping the frames at ``frame_indices``.

    The frame count comes from the stream header, as in the original; when the header has none, the
    frames are counted by decoding once first. A clip with fewer than ``count`` frames, or that cannot be
    decoded, raises BadVideoError (the original repeated frames of short clips, or kept fewer)."""
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise BadVideoError(f"{video}: no video stream.")
            total = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
            if total < count:
                raise BadVideoError(f"{video}: {total} frame(s), {count} are needed.")
            wanted = frame_indices(total, count)
            container.seek(0)
            kept: dict[int, Image.Image] = {}
            for position, frame in enumerate(container.decode(video=0)):
                if position in wanted:
                    kept[position] = frame.to_image()
                if position >= wanted[-1]:
                    break
    except (av.FFmpegError, OSError) as error:
        raise BadVideoError(f"{video}: cannot be decoded ({error}).") from None
    missing = [i for i in wanted if i not in kept]
    if missing:
        raise BadVideoError(f"{video}: the header promises {total} frames but frames {missing} could not be decoded.")
    return [kept[i] for i in wanted]


def find_subset_root(video_dir: Path) -> Path:
    for root in (video_dir / "UCF101_subset", video_dir):
        if all((root / split).is_dir() for split in SPLITS):
            return root
    require_folder(video_dir, "--video_dir")
    raise RecipeError(f"--video_dir {video_dir}: expected UCF101_subset/{{train,val,test}}/<Class>/*.avi in it.")


def download_subset(tmp_dir: Path) -> Path:
    """Fetch and unpack the subset the original uses (needs network access)."""
    from huggingface_hub import hf_hub_download

    require_local_or_reachable(
        "sayakpaul/ucf101-subset",
        "--video_dir",
        "pass --video_dir with UCF101_subset/{train,val,test} in it "
        "(`python -m phi3v.synthetic ucf101 --out DIR` writes a synthetic one).",
    )
    tmp_dir.mkdir(parents=True)
    archive = hf_hub_download("sayakpaul/ucf101-subset", "UCF101_subset.tar.gz", repo_type="dataset")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_dir, filter="data")
    return find_subset_root(tmp_dir)


def convert(
    subset_root: Path, out_dir: Path, show_progress: bool = True, skip_bad_videos: bool = False
) -> dict[str, int]:
    """Write frames and jsonl files; returns the number of videos written per split."""
    videos = {split: sorted((subset_root / split).glob("*/*.avi")) for split in SPLITS}
    classes = sorted({video.parent.name for split in SPLITS for video in videos[split]})
    if not classes:
        raise RecipeError(f"{subset_root}: no .avi videos under {'/'.join(SPLITS)}/<Class>/.")
    prompt = "Classify the video into one of the following classes: " + ", ".join(classes) + "."
    index, written, skipped = 0, {}, []
    for split in SPLITS:
        partial = out_dir / f"ucf101_{split}.jsonl.partial"
        with open(partial, "w") as jsonl:
            for video in tqdm(videos[split], desc=f"{split} videos", disable=not show_progress):
                try:
                    frames = read_frames(video)
                except BadVideoError as error:
                    if not skip_bad_videos:
                        partial.unlink()
                        raise BadVideoError(f"{error} Remove the clip, or pass --skip_bad_videos.") from None
                    skipped.append(str(error))
                    continue
                record = _write_clip(video, frames, split, index, prompt, out_dir)
                jsonl.write(json.dumps(record) + "\n")
                index += 1
        partial.replace(out_dir / f"ucf101_{split}.jsonl")
        written[split] = index - sum(written.values())
    if skipped:
        print(f"--skip_bad_videos: skipped {len(skipped)} clip(s):\n  " + "\n  ".join(skipped))
    return written


def _write_clip(video: Path, frames: list[Image.Image], split: str, index: int, prompt: str, out_dir: Path) -> dict:
    relative = Path(split) / video.parent.name
    (out_dir / "images" / relative).mkdir(parents=True, exist_ok=True)
    paths = []
    for k, frame in enumerate(frames):
        path = relative / f"{video.stem}.{k}.jpg"
        frame.save(out_dir / "images" / path)
        paths.append(path.as_posix())
    turn = {"images": paths, "user": prompt, "assistant": video.parent.name}
    return {"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [turn]}


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(ConvertArguments, argv, __doc__)
    out_dir, tmp_dir = Path(args.out_dir), Path(args.tmp_dir)
    if args.video_dir is not None:
        subset_root = find_subset_root(Path(args.video_dir))  # before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        counts = convert(subset_root, out_dir, skip_bad_videos=args.skip_bad_videos)
    else:
        if tmp_dir.exists():
            raise RecipeError(
                f"--tmp_dir {tmp_dir} already exists; remove it or pick another (it is deleted afterwards)."
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            counts = convert(download_subset(tmp_dir), out_dir, skip_bad_videos=args.skip_bad_videos)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Wrote {counts} videos as {FRAMES_PER_VIDEO} frames each to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
