"""convert_ucf101.py on real encoded clips: frame choice, layout and jsonl fields."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from convert_ucf101 import BadVideoError, convert, frame_indices, read_frames
from phi3v.data.synthetic import UCF101_CLASSES, write_ucf101


def test_frame_indices_match_the_original_spacing():
    assert frame_indices(24) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert frame_indices(100) == np.arange(0, 100, 100 / 8).astype(int).tolist()
    assert all(len(frame_indices(t)) == 8 for t in range(8, 400))


def write_counting_clip(path: Path, frames: int) -> None:
    """Frame t is a flat grey of level 8*t, so each decoded frame tells its own index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(frames):
            pixels = np.full((48, 64, 3), 8 * t, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("total", [24, 30, 8])
def test_read_frames_picks_the_spaced_frames(tmp_path, total):
    clip = tmp_path / "count.avi"
    write_counting_clip(clip, total)
    frames = read_frames(clip)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    levels = [np.asarray(f, dtype=float).mean() / 8 for f in frames]
    assert [round(level) for level in levels] == frame_indices(total)


def test_convert_writes_the_original_layout(tmp_path):
    write_ucf101(tmp_path / "videos", {"train": 2, "val": 1, "test": 1})
    out = tmp_path / "out"
    out.mkdir()
    counts = convert(tmp_path / "videos" / "UCF101_subset", out, show_progress=False)
    assert counts == {"train": 20, "val": 10, "test": 10}
    records = {
        split: [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").read_text().splitlines()]
        for split in ("train", "val", "test")
    }
    ids = [r["id"] for split in ("train", "val", "test") for r in records[split]]
    assert ids == [f"{split}-{i:010d}" for i, split in enumerate(["train"] * 20 + ["val"] * 10 + ["test"] * 10)]
    prompt = "Classify the video into one of the following classes: " + ", ".join(sorted(UCF101_CLASSES)) + "."
    for split, split_records in records.items():
        for record in split_records:
            (turn,) = record["conversations"]
            assert record["source"] == "ucf101" and turn["user"] == prompt
            assert turn["assistant"] in UCF101_CLASSES
            assert len(turn["images"]) == 8
            for k, path in enumerate(turn["images"]):
                assert path.startswith(f"{split}/{turn['assistant']}/") and path.endswith(f".{k}.jpg")
                with Image.open(out / "images" / path) as frame:
                    assert frame.format == "JPEG"
    # sorted input order: the same files give the same jsonl on every run
    again = tmp_path / "again"
    again.mkdir()
    convert(tmp_path / "videos" / "UCF101_subset", again, show_progress=False)
    assert (again / "ucf101_train.jsonl").read_text() == (out / "ucf101_train.jsonl").read_text()


def bad_clips(root: Path) -> tuple[Path, Path]:
    """One clip of 5 frames and one that is not a video, in the train split of a small subset."""
    write_ucf101(root, {"train": 1, "val": 1, "test": 1})
    short = root / "UCF101_subset" / "train" / "Archery" / "v_Archery_g09_c01.avi"
    write_counting_clip(short, 5)
    corrupt = root / "UCF101_subset" / "train" / "Basketball" / "v_Basketball_g09_c01.avi"
    corrupt.write_bytes(b"RIFF\x00\x00not really an avi" * 10)
    return short, corrupt


def test_short_and_corrupt_clips_stop_the_conversion(tmp_path):
    short, corrupt = bad_clips(tmp_path / "videos")
    with pytest.raises(BadVideoError, match=r"v_Archery_g09_c01.avi: 5 frame\(s\), 8 are needed\.$"):
        read_frames(short)
    with pytest.raises(BadVideoError, match="cannot be decoded"):
        read_frames(corrupt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ucf101_train.jsonl").write_text("an earlier conversion\n")
    with pytest.raises(BadVideoError, match="v_Archery_g09_c01.avi: 5 frame.*Remove the clip, or pass --skip_bad_vid"):
        convert(tmp_path / "videos" / "UCF101_subset", out, show_progress=False)
    assert (out / "ucf101_train.jsonl").read_text() == "an earlier conversion\n"  # not half overwritten
    assert not list(out.glob("*.partial"))


def test_skip_bad_videos_leaves_them_out_and_counts_them(tmp_path, capsys):
    bad_clips(tmp_path / "videos")
    out = tmp_path / "out"
    out.mkdir()
    counts = convert(tmp_path / "videos" / "UCF101_subset", out, show_progress=False, skip_bad_videos=True)
    assert counts == {"train": 10, "val": 10, "test": 10}
    printed = capsys.readouterr().out
    assert "skipped 2 clip(s)" in printed and "v_Archery_g09_c01.avi: 5 frame(s)" in printed
    assert "v_Basketball_g09_c01.avi: cannot be decoded" in printed
    ids = [json.loads(line)["id"] for line in (out / "ucf101_val.jsonl").read_text().splitlines()]
    assert ids[0] == "val-0000000010"  # ids stay contiguous over the clips written
