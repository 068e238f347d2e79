"""The toy world: 16x16 RGB pictures of one or two subjects, drawn by fixed rules so that they can be scored.

Rules:
- A picture has a background: one of four muted colours (BACKGROUNDS), plus per-pixel noise of at most
  BACKGROUND_NOISE on each channel.
- A subject (an Identity) is a square of side 6 or 8 px made of 2x2 equal parts, each part one saturated PALETTE
  colour, drawn exactly (no noise). Identities never use one colour for all four parts, and any two differ in at
  least 2 of the 4 parts.
- A view (Scene) puts the subject in the left or the right half of the picture, fully inside that half, centred in
  it with a small random jitter; with `ball`, a 3x3 blob of BALL_COLOUR sits in the other half, at least one column
  away from the middle, at a random height.
- A pair picture holds two subjects, one in each half, and no ball.
- A reference photo shows the subject alone and centred, side 8 or 10 px, on REFERENCE_BACKGROUND.
The palette colours are far from every background, from BALL_COLOUR and from REFERENCE_BACKGROUND (at least 100 in
RGB distance), so that a blurred, noisy picture still says which colour each region is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 16
HALF = SIZE // 2
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "red": (170, 70, 70), "green": (70, 150, 70), "blue": (70, 90, 170), "yellow": (170, 160, 60)}
# black, white, magenta, cyan, orange
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 255, 255), (255, 0, 255), (0, 255, 255), (255, 140, 0))
BALL_COLOUR: tuple[int, int, int] = (128, 128, 128)
# Not black, which is in PALETTE: a dark grey 111 away from black and further from every other palette colour.
REFERENCE_BACKGROUND: tuple[int, int, int] = (64, 64, 64)
SIDES = ("left", "right")
BACKGROUND_NOISE = 6
SUBJECT_SIDES = (6, 8)
REFERENCE_SIDES = (8, 10)
BALL_SIDE = 3
# How far the subject's top edge may move up or down from the centred position.
VERTICAL_JITTER = 2


@dataclass(frozen=True)
class Identity:
    index: int
    parts: tuple[int, int, int, int]  # PALETTE indices: top-left, top-right, bottom-left, bottom-right


@dataclass(frozen=True)
class Scene:
    background: str  # a BACKGROUNDS key
    side: str  # "left" | "right": where the subject stands
    ball: bool  # whether the ball (second object) is in the picture


def identities(count: int = 16, seed: int = 0) -> list[Identity]:
    """`count` distinct identities drawn reproducibly from `seed`.

    They come from a code where the fourth part is a function of the first three: d = order[(a + b + c) % P], with
    `order` a random permutation of the P palette colours. Two words that differ in only one of the first three
    parts also differ in the fourth, so every pair differs in at least 2 parts, and there are P**3 words, the most
    any such set can have (two identities sharing their first three parts would differ in at most one). `order` is
    drawn so that no word is a single colour.
    """
    colours = len(PALETTE)
    most = colours ** 3
    if not 0 <= count <= most:
        raise ValueError(f"cannot draw {count} identities: with {colours} colours and 4 parts, identities that "
                         f"pairwise differ in at least 2 parts number at most {colours}**3 = {most}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(colours)
        # The single-colour word (c, c, c, c) is in the code exactly when order[3c % P] == c.
        if all(order[3 * c % colours] != c for c in range(colours)):
            break
    prefixes = rng.permutation(most)[:count]
    drawn = []
    for index, prefix in enumerate(prefixes):
        a, b, c = prefix // colours ** 2, prefix // colours % colours, prefix % colours
        drawn.append(Identity(index, (int(a), int(b), int(c), int(order[(a + b + c) % colours]))))
    return drawn


def scenes() -> list[Scene]:
    """All 4 x 2 x 2 scenes: by background, then side, then without and with the ball."""
    return [Scene(background, side, ball) for background in BACKGROUNDS for side in SIDES for ball in (False, True)]


def _check_once(word: str, text: str) -> str:
    if word.split() != [word] or text.replace(",", "").split().count(word) != 1:
        raise ValueError(f"the subject word {word!r} must be one word that the caption {text!r} holds exactly once")
    return text


def caption(word: str, scene: Scene) -> str:
    """E.g. "a toy on the left, red background, with a ball"; no ball phrase when the ball is absent."""
    text = f"a {word} on the {scene.side}, {scene.background} background" + (", with a ball" if scene.ball else "")
    return _check_once(word, text)


def pair_caption(left_word: str, right_word: str, background: str) -> str:
    """E.g. "a toy on the left and a pet on the right, green background"."""
    text = f"a {left_word} on the left and a {right_word} on the right, {background} background"
    return _check_once(right_word, _check_once(left_word, text))


def _background(colour: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(SIZE, SIZE, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def _paint_subject(image: np.ndarray, mask: np.ndarray, identity: Identity, top: int, left: int, side: int) -> None:
    part = side // 2
    for position, colour in enumerate(identity.parts):
        row, column = top + part * (position // 2), left + part * (position % 2)
        image[row:row + part, column:column + part] = PALETTE[colour]
    mask[top:top + side, left:left + side] = 255


def _place_in_half(half: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a subject centred in `half` with a small jitter, fully inside it."""
    side = int(rng.choice(SUBJECT_SIDES))
    left = int(rng.integers(0, HALF - side + 1)) + (HALF if half == "right" else 0)
    top = (SIZE - side) // 2 + int(rng.integers(-VERTICAL_JITTER, VERTICAL_JITTER + 1))
    return top, left, side


def draw(identity: Identity, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One view of `identity` in `scene`: (image uint8 (SIZE, SIZE, 3), mask uint8 (SIZE, SIZE), 255 on the subject)."""
    if scene.side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {scene.side!r}")
    image = _background(BACKGROUNDS[scene.background], rng)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    _paint_subject(image, mask, identity, *_place_in_half(scene.side, rng))
    if scene.ball:
        # At least one column from the middle: a blurred subject spills one pixel over it, and must not reach the ball.
        gap = int(rng.integers(1, HALF - BALL_SIDE + 1))
        left = HALF + gap if scene.side == "left" else HALF - gap - BALL_SIDE
        top = int(rng.integers(0, SIZE - BALL_SIDE + 1))
        image[top:top + BALL_SIDE, left:left + BALL_SIDE] = BALL_COLOUR
    return image, mask


def draw_pair(left: Identity, right: Identity, background: str,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two subjects, `left` in the left half and `right` in the right half, no ball: (image, left_mask, right_mask)."""
    image = _background(BACKGROUNDS[background], rng)
    masks = []
    for identity, half in ((left, "left"), (right, "right")):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        _paint_subject(image, mask, identity, *_place_in_half(half, rng))
        masks.append(mask)
    return image, masks[0], masks[1]


def draw_reference(identity: Identity, rng: np.random.Generator) -> np.ndarray:
    """A reference photo: the subject alone, side 8 or 10 px, centred within 1 px, on REFERENCE_BACKGROUND."""
    image = np.full((SIZE, SIZE, 3), REFERENCE_BACKGROUND, np.uint8)
    side = int(rng.choice(REFERENCE_SIDES))
    top, left = (SIZE - side) // 2 + rng.integers(-1, 2, size=2)
    _paint_subject(image, np.zeros((SIZE, SIZE), np.uint8), identity, int(top), int(left), side)
    return image
