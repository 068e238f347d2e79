"""An independent scorer for the toy world's pictures: pixel statistics and nearest-colour decisions, no learned model.

It knows the drawing rules (study/world.py) and reads a picture as they say:
- the background is the BACKGROUNDS colour that most pixels are nearest to (among every colour the world draws);
- the subject is the pixels nearer to a PALETTE colour than to that background's measured colour; its half is the
  half with more of them, its box spans the rows and columns that hold at least two of them in that half;
- each quarter of the box is one part, measured as the mean colour of the quarter's inner pixels (a blurred
  picture mixes colours at the edges), and the identity is the one whose part colours are nearest on average;
- the ball is a 3x3 window holding at least MIN_BALL_PIXELS pixels nearest to BALL_COLOUR, outside the subject's
  box grown by one pixel (a blurred black-and-white seam inside the subject is grey too).
`validate` shows that these decisions are right on the world's own pictures, also blurred and noisy, and no
better than chance on pictures that carry no information (uniform noise, blank backgrounds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import cycle

import numpy as np

from .world import (BACKGROUNDS, BACKGROUND_NOISE, BALL_COLOUR, HALF, PALETTE, SIDES, SIZE, Identity, draw, draw_pair,
                    scenes)

MIN_SUBJECT_PIXELS = 12  # a subject is at least 6x6 = 36 px; fewer palette pixels in a half is no subject
MIN_LINE_PIXELS = 2  # a row or column belongs to the subject's box when it holds this many subject pixels
MIN_BALL_PIXELS = 3  # a blurred 3x3 ball keeps about 5 pixels nearest BALL_COLOUR
ATTRIBUTES = ("background", "side", "ball", "identity", "pair_identity", "pair_no_leak")
GROUND_TRUTH_MINIMUM = 0.95
DEGRADED_MINIMUM = 0.90
DEGRADE_NOISE_SIGMA = 12.0
# Which subjects of the validation pairs carry a part of the other identity (left, right), in turn: half of them.
LEAK_PATTERNS = ((False, False), (True, False), (False, True), (True, True))

_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_COLOURS = np.array([BACKGROUNDS[name] for name in _BACKGROUND_NAMES], float)
_PALETTE = np.array(PALETTE, float)
_BALL = np.array(BALL_COLOUR, float)


@dataclass(frozen=True)
class ImageScore:
    background: str  # the BACKGROUNDS key nearest the picture's background
    side: str | None  # where the subject is; None when no subject is found
    ball: bool  # whether a ball blob is there
    identity: int | None  # index into the identities passed in of the nearest identity; None when no subject is found
    # Mean over the 4 parts of the RGB distance between the measured part colour and the identity's, divided by 255:
    # 0 is exact, sqrt(3) the most; nan when no subject is found.
    identity_distance: float
    own_distance: float | None  # the same distance to `expected` when given, else None


@dataclass(frozen=True)
class PairScore:
    left_identity_correct: bool  # the left subject's nearest identity is the left word's identity
    right_identity_correct: bool
    left_leak: bool  # the left subject carries a part of the right identity (see score_pair)
    right_leak: bool


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected an image of shape {(SIZE, SIZE, 3)}, got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(float)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(float), 0.0, 1.0) * 255.0
    raise TypeError(f"expected uint8 or float pixels in [0, 1], got {image.dtype}")


def _nearest(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest of `colours` (K, 3) for each pixel of `pixels` (..., 3)."""
    return np.linalg.norm(pixels[..., None, :] - colours, axis=-1).argmin(-1)


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, measured colour): the background most pixels are nearest to, among every colour the world draws."""
    colours = np.concatenate([_BACKGROUND_COLOURS, _PALETTE, _BALL[None]])
    nearest = _nearest(image, colours)
    votes = np.bincount(nearest.ravel(), minlength=len(colours))[:len(_BACKGROUND_NAMES)]
    winner = int(votes.argmax())
    if votes[winner] == 0:  # a picture of palette colours only: the nearest background to its median
        measured = np.median(image.reshape(-1, 3), axis=0)
        return _BACKGROUND_NAMES[int(_nearest(measured, _BACKGROUND_COLOURS))], measured
    return _BACKGROUND_NAMES[winner], np.median(image[nearest == winner], axis=0)


def _subject_pixels(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels nearer a PALETTE colour than the measured background (the ball's grey is nearer the background)."""
    return _nearest(image, np.concatenate([background[None], _PALETTE])) > 0


def _in_half(pixels: np.ndarray, half: str) -> np.ndarray:
    kept = np.zeros_like(pixels)
    columns = slice(0, HALF) if half == "left" else slice(HALF, SIZE)
    kept[:, columns] = pixels[:, columns]
    return kept


def _box(subject: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of the rows and columns holding the subject."""
    rows = np.flatnonzero(subject.sum(1) >= MIN_LINE_PIXELS)
    columns = np.flatnonzero(subject.sum(0) >= MIN_LINE_PIXELS)
    if subject.sum() < MIN_SUBJECT_PIXELS or len(rows) < 2 or len(columns) < 2:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def _inner(start: int, stop: int) -> slice:
    """A part's pixels away from its edges, where blur mixes in the neighbours' colours."""
    return slice(start + 1, stop - 1) if stop - start >= 3 else slice(start, stop)


def _part_colours(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(4, 3) mean colours of the box's quarters: top-left, top-right, bottom-left, bottom-right."""
    top, bottom, left, right = box
    middle_row, middle_column = (top + bottom) // 2, (left + right) // 2
    rows = (_inner(top, middle_row), _inner(middle_row, bottom))
    columns = (_inner(left, middle_column), _inner(middle_column, right))
    return np.array([image[rows[position // 2], columns[position % 2]].reshape(-1, 3).mean(0) for position in range(4)])


def _part_distances(parts: np.ndarray, identity: Identity) -> np.ndarray:
    """(4,) RGB distance / 255 of each measured part colour from the identity's colour at that position."""
    return np.linalg.norm(parts - _PALETTE[list(identity.parts)], axis=-1) / 255.0


def _subject(image: np.ndarray, background: np.ndarray,
             half: str) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """(box, part colours) of the subject in `half`, or None."""
    box = _box(_in_half(_subject_pixels(image, background), half))
    return None if box is None else (box, _part_colours(image, box))


def _nearest_identity(parts: np.ndarray, identities: list[Identity]) -> tuple[int, float]:
    distances = [float(_part_distances(parts, identity).mean()) for identity in identities]
    best = int(np.argmin(distances))
    return best, distances[best]


def _has_ball(ball_pixels: np.ndarray) -> bool:
    """Whether some 3x3 window holds MIN_BALL_PIXELS ball pixels: a blob, not pixels that noise scattered."""
    padded = np.pad(ball_pixels.astype(int), 1)
    windows = sum(padded[dy:dy + SIZE, dx:dx + SIZE] for dy in range(3) for dx in range(3))
    return bool(windows.max() >= MIN_BALL_PIXELS)


def score_image(image: np.ndarray, identities: list[Identity], expected: Identity | None = None) -> ImageScore:
    """Background, subject side, ball and identity of one view; `image` is uint8 (SIZE, SIZE, 3) or float in [0, 1]."""
    pixels = _as_float(image)
    background, measured = _background(pixels)
    subject_pixels = _subject_pixels(pixels, measured)
    counts = [_in_half(subject_pixels, half).sum() for half in SIDES]
    side = SIDES[int(np.argmax(counts))]
    subject = _subject(pixels, measured, side)
    ball_pixels = _nearest(pixels, np.concatenate([measured[None], _BALL[None], _PALETTE])) == 1
    if subject is None:
        return ImageScore(background, None, _has_ball(ball_pixels), None, float("nan"),
                          None if expected is None else float("nan"))
    box, parts = subject
    top, bottom, left, right = box
    ball_pixels[max(top - 1, 0):bottom + 1, max(left - 1, 0):right + 1] = False
    identity, distance = _nearest_identity(parts, identities)
    own = None if expected is None else float(_part_distances(parts, expected).mean())
    return ImageScore(background, side, _has_ball(ball_pixels), identity, distance, own)


def score_pair(image: np.ndarray, identities: list[Identity], left: Identity, right: Identity) -> PairScore:
    """Identity and leak of each half's subject in a pair picture.

    A subject leaks when at least one of its parts, at a position where the two identities differ, is nearer in
    colour to the other identity's part there than to its own identity's. A half with no subject is neither correct
    nor leaking.
    """
    pixels = _as_float(image)
    _, measured = _background(pixels)
    verdicts = []
    for half, own, other in (("left", left, right), ("right", right, left)):
        subject = _subject(pixels, measured, half)
        if subject is None:
            verdicts.append((False, False))
            continue
        parts = subject[1]
        found, _ = _nearest_identity(parts, identities)
        nearer_other = _part_distances(parts, other) < _part_distances(parts, own)
        differ = np.array(own.parts) != np.array(other.parts)
        verdicts.append((identities[found] == own, bool((nearer_other & differ).any())))
    (left_correct, left_leak), (right_correct, right_leak) = verdicts
    return PairScore(left_correct, right_correct, left_leak, right_leak)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 3x3 box blur (edges repeated) and Gaussian noise of sigma DEGRADE_NOISE_SIGMA: what a generator's
    imperfect picture looks like. uint8 in, uint8 out."""
    padded = np.pad(image.astype(float), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[dy:dy + SIZE, dx:dx + SIZE] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(np.rint(blurred + rng.normal(0.0, DEGRADE_NOISE_SIGMA, blurred.shape)), 0, 255).astype(np.uint8)


def _band(chance: float, count: int) -> float:
    """How far from chance an accuracy over `count` uninformative pictures may be: 3 standard errors + 0.05."""
    return 3.0 * float(np.sqrt(chance * (1.0 - chance) / count)) + 0.05


@dataclass
class Validation:
    ground_truth: dict[str, float]  # accuracy per attribute on the world's own pictures
    degraded: dict[str, float]  # the same pictures blurred and noisy (degrade)
    noise: dict[str, float]  # uniform random pixels, scored against random nominal labels
    blank: dict[str, float]  # a background alone, scored against random nominal labels
    chance: dict[str, float]  # the accuracy of guessing, per attribute
    band: dict[str, float]  # how far from chance a noise or blank accuracy may be (_band)
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = not self.failures()

    def failures(self) -> list[str]:
        """Each failed requirement: ground truth >= 0.95 and degraded >= 0.90 on every attribute; noise within the
        band of chance; blank no higher than chance + band (an honest scorer finds no subject there, so it is
        wrong more often than chance)."""
        failed = []
        for attribute in ATTRIBUTES:
            chance, band = self.chance[attribute], self.band[attribute]
            if self.ground_truth[attribute] < GROUND_TRUTH_MINIMUM:
                failed.append(f"ground truth {attribute}: {self.ground_truth[attribute]:.3f} < {GROUND_TRUTH_MINIMUM}")
            if self.degraded[attribute] < DEGRADED_MINIMUM:
                failed.append(f"degraded {attribute}: {self.degraded[attribute]:.3f} < {DEGRADED_MINIMUM}")
            if abs(self.noise[attribute] - chance) > band:
                failed.append(f"noise {attribute}: {self.noise[attribute]:.3f} is not within {band:.3f} of chance "
                              f"{chance:.3f}")
            if self.blank[attribute] > chance + band:
                failed.append(f"blank {attribute}: {self.blank[attribute]:.3f} > chance {chance:.3f} + {band:.3f}")
        return failed


def _image_hits(score: ImageScore, scene_background: str, side: str, ball: bool, identity: Identity,
                identities: list[Identity]) -> dict[str, bool]:
    return {"background": score.background == scene_background, "side": score.side == side, "ball": score.ball == ball,
            "identity": score.identity is not None and identities[score.identity] == identity}


def _leaked(own: Identity, other: Identity, rng: np.random.Generator) -> Identity:
    """`own` with the part at one position where it differs from `other` replaced by `other`'s part there."""
    position = int(rng.choice(np.flatnonzero(np.array(own.parts) != np.array(other.parts))))
    parts = list(own.parts)
    parts[position] = other.parts[position]
    return Identity(own.index, tuple(parts))


def _pair_hits(score: PairScore, leaks: tuple[bool, bool]) -> dict[str, list[bool]]:
    """Identity is counted for subjects drawn without a leak only (a leaked subject is no identity's exact copy)."""
    correct = (score.left_identity_correct, score.right_identity_correct)
    found_leaks = (score.left_leak, score.right_leak)
    return {"pair_identity": [hit for hit, leak in zip(correct, leaks) if not leak],
            "pair_no_leak": [found == leak for found, leak in zip(found_leaks, leaks)]}


def validate(identities: list[Identity], seed: int = 0, images_per_identity: int = 20) -> Validation:
    """Accuracy of score_image and score_pair on four sets of pictures, all drawn from `seed`.

    Per identity: `images_per_identity` views in random scenes and `images_per_identity // 2` pairs with a random
    other identity, their subjects carrying one part of the other identity in turn as LEAK_PATTERNS says
    ("pair_no_leak" is the accuracy of the leak decision). The degraded set is the same pictures through `degrade`;
    the noise and blank sets have as many pictures of uniform random pixels and of a plain noisy background, each
    with random nominal labels (scene, identities, leaks) that the picture says nothing about.
    """
    if len(identities) < 2 or images_per_identity < 2:
        raise ValueError("validation needs at least 2 identities (pairs use two different ones) and at least 2 "
                         "images per identity (one pair each)")
    rng = np.random.default_rng(seed)
    all_scenes = scenes()
    sets = ("ground_truth", "degraded", "noise", "blank")
    hits: dict[str, dict[str, list[bool]]] = {name: {attribute: [] for attribute in ATTRIBUTES} for name in sets}
    leak_patterns = cycle(LEAK_PATTERNS)

    def blank() -> np.ndarray:
        colour = _BACKGROUND_COLOURS[rng.integers(len(_BACKGROUND_COLOURS))]
        noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, (SIZE, SIZE, 3))
        return np.clip(colour + noise, 0, 255).astype(np.uint8)

    def uniform() -> np.ndarray:
        return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)

    for position, identity in enumerate(identities):
        for _ in range(images_per_identity):
            scene = all_scenes[rng.integers(len(all_scenes))]
            image, _ = draw(identity, scene, rng)
            nominal = identities[rng.integers(len(identities))]
            nominal_scene = all_scenes[rng.integers(len(all_scenes))]
            for name, picture, truth, labels in (("ground_truth", image, identity, scene),
                                                 ("degraded", degrade(image, rng), identity, scene),
                                                 ("noise", uniform(), nominal, nominal_scene),
                                                 ("blank", blank(), nominal, nominal_scene)):
                score = score_image(picture, identities, expected=truth)
                for attribute, hit in _image_hits(score, labels.background, labels.side, labels.ball, truth,
                                                  identities).items():
                    hits[name][attribute].append(hit)
        for _ in range(images_per_identity // 2):
            leaks = next(leak_patterns)
            other = identities[(position + 1 + rng.integers(len(identities) - 1)) % len(identities)]
            left = _leaked(identity, other, rng) if leaks[0] else identity
            right = _leaked(other, identity, rng) if leaks[1] else other
            background = _BACKGROUND_NAMES[rng.integers(len(_BACKGROUND_NAMES))]
            image, _, _ = draw_pair(left, right, background, rng)
            for name, picture in (("ground_truth", image), ("degraded", degrade(image, rng)), ("noise", uniform()),
                                  ("blank", blank())):
                for attribute, found in _pair_hits(score_pair(picture, identities, identity, other), leaks).items():
                    hits[name][attribute].extend(found)
    chance = {"background": 1 / len(BACKGROUNDS), "side": 1 / len(SIDES), "ball": 0.5, "identity": 1 / len(identities),
              "pair_identity": 1 / len(identities), "pair_no_leak": 0.5}
    accuracy = {name: {attribute: float(np.mean(found)) for attribute, found in hits[name].items()} for name in sets}
    band = {attribute: _band(chance[attribute], len(hits["noise"][attribute])) for attribute in ATTRIBUTES}
    return Validation(**accuracy, chance=chance, band=band)


def check_validated(validation: Validation) -> None:
    """Raise RuntimeError naming each failed requirement (attribute, accuracy, threshold), if any."""
    failed = validation.failures()
    if failed:
        raise RuntimeError("the scorer failed its validation: " + "; ".join(failed))
