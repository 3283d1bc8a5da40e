"""Build class-per-folder image sets from what installs offline, for benchmarks beyond the
two bundled ones.

- ``emoji``: every fully-qualified emoji of Unicode's emoji-test.txt (Debian ``unicode-data``),
  drawn with Noto Color Emoji (Debian ``fonts-noto-color-emoji``), one folder per Unicode group
  (9 classes, 80-400 drawings each; skin-tone variants and the "Component" group left out, so
  no drawing appears twice in another colour). A real image set in a third domain (colour
  drawings), with classes as broad as "object" or "symbol".
- ``mix18``: 18 classes of JPEGs, 10 Fashion-MNIST garments and 8 digits, at 256 px: the
  stand-in for an 18-class user folder (the cost and time of `cbbt tune` on a folder of files).

    python -m benchmarks.make_image_sets emoji runs/emoji
    python -m benchmarks.make_image_sets mix18 runs/mix18 --per-class 80
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from client.data import load_dataset

logger = logging.getLogger(__name__)

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# Noto Color Emoji is a bitmap font with one strike: 109 px is the size it renders at.
EMOJI_FONT_SIZE = 109

# Unicode's group names -> folder names that read as class names ("_" becomes a space).
EMOJI_CLASSES = {
    "Smileys & Emotion": "smiley_face_or_emotion",
    "People & Body": "person_or_body_part",
    "Animals & Nature": "animal_or_plant",
    "Food & Drink": "food_or_drink",
    "Travel & Places": "place_vehicle_or_weather",
    "Activities": "sport_game_or_event",
    "Objects": "everyday_object",
    "Symbols": "symbol_or_sign",
    "Flags": "flag",
}


def emoji_by_group(emoji_test: Path) -> dict[str, list[str]]:
    """The fully-qualified emoji of each group, skin-tone variants left out."""
    groups: dict[str, list[str]] = defaultdict(list)
    group = ""
    for line in emoji_test.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, name = rest.split("#", 1)
            if status.strip() != "fully-qualified" or "skin tone" in name or group not in EMOJI_CLASSES:
                continue
            groups[group].append("".join(chr(int(c, 16)) for c in codes.split()))
    return dict(groups)


def draw_emoji(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """One emoji on white, cropped to its drawing with a margin; None where the font has no glyph."""
    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE * 3, EMOJI_FONT_SIZE * 2), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    drawing = canvas.crop(box)
    if drawing.width > 1.6 * EMOJI_FONT_SIZE:  # a sequence the font draws as several glyphs
        return None
    side = max(drawing.size) + 16
    out = Image.new("RGB", (side, side), (255, 255, 255))
    out.paste(drawing, ((side - drawing.width) // 2, (side - drawing.height) // 2), drawing)
    return out


def make_emoji(out: Path) -> None:
    for path in (EMOJI_TEST, EMOJI_FONT):
        if not path.exists():
            sys.exit(f"error: {path} is missing (apt-get install -y unicode-data fonts-noto-color-emoji)")
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE)
    for group, emoji in emoji_by_group(EMOJI_TEST).items():
        folder = out / EMOJI_CLASSES[group]
        folder.mkdir(parents=True, exist_ok=True)
        drawn = 0
        for i, text in enumerate(emoji):
            image = draw_emoji(text, font)
            if image is not None:
                image.save(folder / f"{i:04d}.png")
                drawn += 1
        logger.info("%s: %d drawings (%d not drawable)", folder.name, drawn, len(emoji) - drawn)


def make_mix18(out: Path, per_class: int, size: int = 256) -> None:
    """10 Fashion-MNIST classes and digits 0-7, `per_class` JPEGs each, as the client renders them."""
    sources = [("fashion-mnist", 10), ("digits", 8)]
    for spec, n_classes in sources:
        data = load_dataset(spec, seed=0)
        taken: dict[int, int] = defaultdict(int)
        for example in data.train + data.test:
            if example.label >= n_classes or taken[example.label] >= per_class:
                continue
            name = data.class_names[example.label].replace(" ", "_").replace("/", "_or_")
            folder = out / (f"digit_{name}" if spec == "digits" else name)
            folder.mkdir(parents=True, exist_ok=True)
            image = example.image().convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{taken[example.label]:04d}.jpg", quality=90)
            taken[example.label] += 1
        logger.info("%s: %d classes x %d images", spec, n_classes, per_class)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=["emoji", "mix18"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=80, help="mix18: images per class")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.set == "emoji":
        make_emoji(args.out)
    else:
        make_mix18(args.out, args.per_class)


if __name__ == "__main__":
    main()
