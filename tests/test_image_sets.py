"""benchmarks/make_image_sets.py: the offline image sets the benchmarks use beyond the bundled two."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageFont

from benchmarks.make_image_sets import (
    EMOJI_FONT,
    EMOJI_FONT_SIZE,
    draw_emoji,
    emoji_by_group,
    make_mix18,
)
from client.data import DEFAULT_FASHION_MNIST_DIR, load_dataset

EMOJI_TEST_SAMPLE = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
263A FE0F ; fully-qualified # ☺️ E0.6 smiling face
263A ; unqualified # ☺ E0.6 smiling face
# group: People & Body
# subgroup: hand-fingers-open
1F44B ; fully-qualified # 👋 E0.6 waving hand
1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone
# group: Component
1F3FB ; component # 🏻 E1.0 light skin tone
1F9B0 ; fully-qualified # 🦰 E11.0 red hair
"""


def test_emoji_are_grouped_fully_qualified_without_skin_tones_or_components(tmp_path: Path) -> None:
    source = tmp_path / "emoji-test.txt"
    source.write_text(EMOJI_TEST_SAMPLE, encoding="utf-8")
    assert emoji_by_group(source) == {
        "Smileys & Emotion": ["\U0001f600", "\u263a\ufe0f"],
        "People & Body": ["\U0001f44b"],
    }


@pytest.mark.skipif(not EMOJI_FONT.exists(), reason="Debian's fonts-noto-color-emoji is not installed")
def test_an_emoji_is_drawn_in_colour_on_white_and_a_missing_glyph_is_none() -> None:
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)
    dog = draw_emoji("\U0001f436", font)
    assert dog is not None and dog.mode == "RGB" and dog.width == dog.height
    assert dog.getpixel((0, 0)) == (255, 255, 255)  # the margin
    colours = {dog.getpixel((x, y)) for x in range(0, dog.width, 4) for y in range(0, dog.height, 4)}
    assert any(len(set(c)) > 1 for c in colours)  # not grey: the colour bitmap was drawn
    assert draw_emoji("\U0010fffd", font) is None  # a private-use code point: no glyph, nothing drawn


@pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_mix18_is_a_class_per_folder_set_the_client_loads(tmp_path: Path) -> None:
    make_mix18(tmp_path, per_class=6, size=64)
    data = load_dataset(f"imagefolder:{tmp_path}", seed=0)
    assert len(data.class_names) == 18
    assert "digit zero" in data.class_names and "Ankle boot" in data.class_names
    assert len(data.train) + len(data.test) == 18 * 6
    with Image.open(next(tmp_path.glob("digit_seven/*.jpg"))) as image:
        assert image.size == (64, 64)
