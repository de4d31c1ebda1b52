"""Opening a sample's images: files, hub rows' {"bytes", "path"} and PIL images; bad ones named, with the fix."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v.data.images import BadImageError, image_label, load_image, load_sample_image
from tests.conftest import noise_image


def picture(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return noise_image(width, height, seed)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("format, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_a_good_file_is_decoded_fully(tmp_path, format, suffix):
    original = picture(40, 30)
    path = written(tmp_path / f"a{suffix}", encoded(original, format))
    for ref in (path, str(path)):
        image = load_image(ref)
        assert image.size == (40, 30) and image.mode == "RGB"
        if format == "PNG":  # lossless: the very pixels
            assert np.array_equal(np.asarray(image), np.asarray(original))
    image.getpixel((0, 0))  # usable after the file was closed


def test_a_pil_image_is_used_as_it_is():
    image = picture()
    assert load_image(image) is image


def test_a_missing_file(tmp_path):
    with pytest.raises(BadImageError) as raised:
        load_image(tmp_path / "gone.png")
    assert str(raised.value) == f"{tmp_path / 'gone.png'} does not exist."


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        load_image(tmp_path)


GOOD_PNG = encoded(picture(64, 48), "PNG")
GOOD_JPEG = encoded(picture(64, 48), "JPEG")
BROKEN = {
    "empty": (b"", "not an image file PIL can read (empty, or another format): replace it."),
    "text": (b"just some text, not a picture\n", "not an image file PIL can read (empty, or another format)"),
    "truncated_png": (GOOD_PNG[: len(GOOD_PNG) // 2], "corrupt or truncated image data ("),
    "truncated_jpeg": (GOOD_JPEG[:300], "corrupt or truncated image data ("),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_say_what_is_wrong_and_what_to_do(tmp_path, name):
    data, message = BROKEN[name]
    path = written(tmp_path / "a.png", data)
    with pytest.raises(BadImageError) as raised:
        load_image(path)
    assert str(raised.value).startswith(message)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no PIL traceback behind it


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_hub_bytes_say_the_same(name):
    data, message = BROKEN[name]
    with pytest.raises(BadImageError) as raised:
        load_image({"bytes": data, "path": "x.png"})
    assert str(raised.value).startswith(message)


def test_hub_bytes_are_decoded():
    original = picture(50, 20)
    image = load_image({"bytes": encoded(original, "PNG"), "path": "rows/0.png"})
    assert image.size == (50, 20) and np.array_equal(np.asarray(image), np.asarray(original))
    assert load_image({"bytes": encoded(original, "PNG"), "path": None}).size == (50, 20)


def test_hub_bytes_follow_the_exif_orientation():
    """As datasets decodes a hub image: a photo stored sideways with "rotate 90" in its EXIF comes upright."""
    stored = picture(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    image = load_image({"bytes": encoded(stored, "JPEG", exif=exif.tobytes()), "path": None})
    assert image.size == (20, 40)


def test_a_hub_row_holding_only_a_path_is_refused_unopened(tmp_path):
    elsewhere = written(tmp_path / "secret.png", GOOD_PNG)  # a real image: it must not be read all the same
    with pytest.raises(BadImageError) as raised:
        load_image({"bytes": None, "path": str(elsewhere)})
    assert str(raised.value) == (
        f"the image holds no data, only a path ({str(elsewhere)!r}); hub datasets must embed their images."
    )


def test_decompression_bombs_are_refused_with_the_limit(tmp_path, monkeypatch):
    path = written(tmp_path / "big.png", encoded(picture(100, 100), "PNG"))  # 10,000 pixels
    for limit in (6_000, 4_000):  # over the limit (PIL warns), and over twice the limit (PIL raises)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(BadImageError) as raised:
            load_image(path)
        message = str(raised.value)
        assert f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,} pixels" in message
        assert message.endswith("resize it, or drop the sample.")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (100, 100)  # at the limit is fine


@pytest.mark.parametrize(
    "ref, label",
    [
        ("images/a.png", "image 2 (images/a.png)"),
        (Path("/data/b.jpg"), "image 2 (/data/b.jpg)"),
        ({"bytes": b"...", "path": "rows/7.png"}, "image 2 (rows/7.png)"),
        ({"bytes": b"...", "path": None}, "image 2"),
        ({"bytes": b"..."}, "image 2"),
        (Image.new("RGB", (2, 2)), "image 2"),
    ],
    ids=["str", "path", "hub_with_path", "hub_without_path", "hub_no_path_key", "pil"],
)
def test_image_label(ref, label):
    assert image_label(2, ref) == label


def test_load_sample_image_names_the_image(tmp_path):
    path = written(tmp_path / "a.png", b"")
    with pytest.raises(BadImageError) as raised:
        load_sample_image(3, path)
    assert (
        str(raised.value) == f"image 3 ({path}): not an image file PIL can read (empty, or another format): replace it."
    )
    with pytest.raises(BadImageError) as raised:
        load_sample_image(1, {"bytes": GOOD_PNG[:100], "path": None})
    assert str(raised.value).startswith("image 1: corrupt or truncated image data")
    with pytest.raises(BadImageError) as raised:
        load_sample_image(2, tmp_path / "gone.png")
    assert str(raised.value) == f"image 2 ({tmp_path / 'gone.png'}): {tmp_path / 'gone.png'} does not exist."


def test_load_sample_image_returns_a_good_image(tmp_path):
    path = written(tmp_path / "a.jpg", GOOD_JPEG)
    assert load_sample_image(1, path).size == (64, 48)


def test_bad_image_error_is_a_value_error():
    """Callers that catch ValueError (a batch's answers, a sample's checks) catch it too."""
    assert issubclass(BadImageError, ValueError)
