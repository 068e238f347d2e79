"""Draws each example workflow's template card, workflows/<name>.jpg: the picture ComfyUI's template browser shows for
workflows/<name>.json. On it: the method, the workflow's title, the subject photos the workflow loads (photos/), each
with its prompt word, and the prompt; captioned as input photos, since a picture the pack did not generate must not
pass for its output.
Run from the pack root (Pillow is in ComfyUI's requirements):
    python tools/build_thumbnails.py
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from build_workflows import EXAMPLES

PACK_ROOT = Path(__file__).resolve().parent.parent
SIDE = 512  # both frontends show the card's picture square
MARGIN = 28
BACKGROUND, INK, MUTED = (26, 28, 34), (238, 238, 238), (150, 156, 168)
METHOD_COLOURS = {"FastComposer": (96, 165, 250), "Nested Attention": (251, 146, 60)}


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)  # Pillow's own font: the same card on every machine


def wrapped(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=face) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def card(example) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, SIDE, 8), fill=METHOD_COLOURS[example.method])
    # at the top right: newer graph editors draw the card's kind ("Node graph") over its top left corner
    draw.text((SIDE - MARGIN, 26), example.method, font=font(40), fill=METHOD_COLOURS[example.method], anchor="ra")
    y = 82
    for line in wrapped(draw, example.title, font(26), SIDE - 2 * MARGIN):
        draw.text((MARGIN, y), line, font=font(26), fill=INK)
        y += 32
    prompt = wrapped(draw, f"\u201c{' '.join(example.prompt.replace('<|image|>', '').split())}\u201d", font(20),
                     SIDE - 2 * MARGIN)
    photos = example.subjects + ((("IPAdapter", example.ipadapter[0]),) if example.ipadapter else ())
    count, below = len(photos), 44 + 26 * len(prompt)  # under the photos: their words, then the prompt
    room = SIDE - 56 - (y + 14)  # down to the caption
    side = min(280, (SIDE - 2 * MARGIN - (count - 1) * 24) // count, room - below)
    left, top = (SIDE - count * side - (count - 1) * 24) // 2, y + 14 + (room - side - below) // 2
    for index, (word, file) in enumerate(photos):
        x = left + index * (side + 24)
        with Image.open(PACK_ROOT / "photos" / file) as photo:
            image.paste(ImageOps.fit(photo.convert("RGB"), (side, side), centering=(0.5, 0.4)), (x, top))
        draw.text((x + side / 2, top + side + 8), word, font=font(24), fill=INK, anchor="mt")
    for line_index, line in enumerate(prompt):
        draw.text((SIDE / 2, top + side + 44 + 26 * line_index), line, font=font(20), fill=INK, anchor="mt")
    draw.text((SIDE / 2, SIDE - 20), "input photos, not generated output", font=font(18), fill=MUTED, anchor="mb")
    return image


if __name__ == "__main__":
    for example in EXAMPLES:
        card(example).save(PACK_ROOT / "workflows" / f"{example.name}.jpg", quality=85, optimize=True)
