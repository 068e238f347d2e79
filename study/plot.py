"""The identity-against-prompt plot, drawn with PIL: one line per method over its strength knob, 95% interval bars."""
from pathlib import Path

from PIL import Image, ImageDraw

from ..encoders.kill_safe import written_beside

COLOURS = {"nested": (31, 119, 180), "decoupled_gated": (44, 160, 44), "decoupled_ungated": (214, 39, 40),
           "nested_single_token": (148, 103, 189), "prior": (0, 0, 0), "wrong_reference": (127, 127, 127)}
SIZE, MARGIN = 640, 70


def identity_prompt_plot(summary: dict, path: Path) -> None:
    """x: prompt adherence, y: identity accuracy, both 0..1; each method's points joined in order of strength."""
    image = Image.new("RGB", (SIZE + 220, SIZE), "white")
    draw = ImageDraw.Draw(image)
    span = SIZE - 2 * MARGIN

    def at(x: float, y: float) -> tuple[float, float]:
        return MARGIN + x * span, SIZE - MARGIN - y * span

    draw.rectangle([*at(0, 1), *at(1, 0)], outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((at(tick, 0)[0] - 10, SIZE - MARGIN + 8), f"{tick:.2f}", fill="black")
        draw.text((MARGIN - 40, at(0, tick)[1] - 6), f"{tick:.2f}", fill="black")
    draw.text((MARGIN + span / 2 - 80, SIZE - 30), "prompt adherence (held-out)", fill="black")
    draw.text((10, 20), "identity accuracy (held-out)", fill="black")
    methods = {}
    for entry in summary.values():
        methods.setdefault(entry["method"], []).append(entry)
    for row, (method, entries) in enumerate(methods.items()):
        colour = COLOURS.get(method, (255, 127, 14))
        points = [at(e["prompt"]["mean"], e["identity"]["mean"]) for e in entries]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for entry, (x, y) in zip(entries, points):
            for key, vertical in (("identity", True), ("prompt", False)):
                half = entry[key]["half_width"] or 0.0
                if vertical:
                    draw.line([(x, y - half * span), (x, y + half * span)], fill=colour)
                else:
                    draw.line([(x - half * span, y), (x + half * span, y)], fill=colour)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            if entry["strength"] is not None:
                draw.text((x + 6, y - 12), f"{entry['strength']:g}", fill=colour)
        draw.rectangle([SIZE + 10, 80 + 22 * row, SIZE + 24, 94 + 22 * row], fill=colour)
        draw.text((SIZE + 30, 80 + 22 * row), method, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_beside(path) as partial:
        image.save(partial, format="PNG")
