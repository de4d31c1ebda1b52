"""The scanned-page images the benchmarks make: off-white paper, a heading and rows of dark word blocks."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw


def scanned_page(width: int, height: int, rng: random.Random) -> Image.Image:
    """A greyscale page of ``width`` x ``height`` pixels, its shades and words drawn from ``rng``."""
    image = Image.new("L", (width, height), rng.randint(232, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((150, 120, 150 + rng.randint(500, 900), 190), fill=30)
    y = 260
    while y < height - 150:
        x = 150
        while x < width - 250:
            word = rng.randint(40, 180)
            draw.rectangle((x, y, x + word, y + 22), fill=rng.randint(10, 70))
            x += word + rng.randint(18, 30)
        y += rng.randint(38, 52)
    return image
