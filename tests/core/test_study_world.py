"""The study's toy world and its scorer: drawing rules checked against an independent reconstruction, and a scorer
that is right on the world's pictures, near chance on noise, and fails its validation when it cheats."""
import itertools

import numpy as np
import pytest

from subject_personalization.study import scorer
from subject_personalization.study.world import (BACKGROUND_NOISE, BACKGROUNDS, BALL_COLOUR, PALETTE,
                                                 REFERENCE_BACKGROUND, SIZE, Identity, Scene, caption, draw, draw_pair,
                                                 draw_reference, identities, pair_caption, scenes)

HALF = SIZE // 2
IDENTITIES = identities()


@pytest.fixture(scope="module")
def validation():
    return scorer.validate(IDENTITIES, seed=0)


def square_of(mask: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the filled square that `mask` must be."""
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, left, side = rows[0], columns[0], len(rows)
    assert len(columns) == side and rows[-1] - top + 1 == side and columns[-1] - left + 1 == side
    expected = np.zeros_like(mask)
    expected[top:top + side, left:left + side] = 255
    assert np.array_equal(mask, expected), "the mask is not exactly one filled square"
    return int(top), int(left), int(side)


def expected_subject(identity: Identity, side: int) -> np.ndarray:
    """The subject's pixels, built position by position: the part is chosen by which half of the square each is in."""
    out = np.zeros((side, side, 3), np.uint8)
    for row, column in itertools.product(range(side), range(side)):
        out[row, column] = PALETTE[identity.parts[2 * (row >= side // 2) + (column >= side // 2)]]
    return out


def colour_mask(image: np.ndarray, colour) -> np.ndarray:
    return (image == np.array(colour, np.uint8)).all(-1)


def test_identities_are_distinct_far_apart_and_reproducible():
    assert len(IDENTITIES) == 16 and [identity.index for identity in IDENTITIES] == list(range(16))
    for identity in IDENTITIES:
        assert len(set(identity.parts)) >= 2 and all(0 <= part < len(PALETTE) for part in identity.parts)
    for first, second in itertools.combinations(IDENTITIES, 2):
        assert sum(a != b for a, b in zip(first.parts, second.parts)) >= 2
    assert identities(16, seed=0) == IDENTITIES
    assert {i.parts for i in identities(16, seed=1)} != {i.parts for i in IDENTITIES}
    everyone = identities(len(PALETTE) ** 3, seed=3)
    assert len({identity.parts for identity in everyone}) == len(PALETTE) ** 3
    assert all(sum(a != b for a, b in zip(x.parts, y.parts)) >= 2 for x, y in itertools.combinations(everyone, 2))


@pytest.mark.parametrize("count", [len(PALETTE) ** 3 + 1, -1])
def test_impossible_identity_count_raises(count):
    with pytest.raises(ValueError, match="identities"):
        identities(count)


def test_colours_are_far_apart():
    others = [*BACKGROUNDS.values(), BALL_COLOUR, REFERENCE_BACKGROUND]
    for part, other in itertools.product(PALETTE, others):
        assert np.linalg.norm(np.subtract(part, other)) >= 100
    for first, second in itertools.combinations([*PALETTE, BALL_COLOUR, *BACKGROUNDS.values()], 2):
        assert np.linalg.norm(np.subtract(first, second)) >= 80


def test_scenes_are_every_combination_once():
    assert len(scenes()) == 16 and len(set(scenes())) == 16 and scenes() == scenes()
    assert {scene.background for scene in scenes()} == set(BACKGROUNDS)


@pytest.mark.parametrize("scene", scenes(), ids=str)
def test_draw_follows_the_rules(scene):
    rng = np.random.default_rng(scenes().index(scene))
    sides = set()
    for identity in IDENTITIES:
        image, mask = draw(identity, scene, rng)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        top, left, side = square_of(mask)
        sides.add(side)
        assert side in (6, 8)
        assert (left >= HALF) == (scene.side == "right") and (left + side <= HALF or left >= HALF)
        assert np.array_equal(image[top:top + side, left:left + side], expected_subject(identity, side))
        ball = colour_mask(image, BALL_COLOUR)
        if scene.ball:
            ball_top, ball_left, ball_side = square_of(ball.astype(np.uint8) * 255)
            assert ball_side == 3
            other_half = (ball_left >= HALF + 1) if scene.side == "left" else (ball_left + 3 <= HALF - 1)
            assert other_half, "the ball is not in the other half, one column away from the middle"
        else:
            assert not ball.any()
        rest = (mask == 0) & ~ball
        assert np.abs(image[rest].astype(int) - BACKGROUNDS[scene.background]).max() <= BACKGROUND_NOISE
    assert sides == {6, 8}
    assert np.array_equal(draw(IDENTITIES[0], scene, np.random.default_rng(3))[0],
                          draw(IDENTITIES[0], scene, np.random.default_rng(3))[0])


def test_draw_pair_puts_one_subject_in_each_half():
    rng = np.random.default_rng(1)
    for left, right in zip(IDENTITIES, IDENTITIES[1:]):
        image, left_mask, right_mask = draw_pair(left, right, "blue", rng)
        for identity, mask, in_half in ((left, left_mask, lambda x, s: x + s <= HALF),
                                        (right, right_mask, lambda x, s: x >= HALF)):
            top, x, side = square_of(mask)
            assert in_half(x, side)
            assert np.array_equal(image[top:top + side, x:x + side], expected_subject(identity, side))
        assert not colour_mask(image, BALL_COLOUR).any()


def test_reference_is_the_subject_alone_and_centred():
    rng = np.random.default_rng(2)
    assert REFERENCE_BACKGROUND not in PALETTE
    for identity in IDENTITIES:
        image = draw_reference(identity, rng)
        subject = ~colour_mask(image, REFERENCE_BACKGROUND)
        top, left, side = square_of(subject.astype(np.uint8) * 255)
        assert side in (8, 10) and abs(top - (SIZE - side) // 2) <= 1 and abs(left - (SIZE - side) // 2) <= 1
        assert np.array_equal(image[top:top + side, left:left + side], expected_subject(identity, side))


def test_captions_name_the_word_once_and_the_scene():
    for scene in scenes():
        text = caption("toy", scene)
        assert text.replace(",", "").split().count("toy") == 1
        assert scene.background in text and scene.side in text and ("ball" in text) == scene.ball
    assert caption("toy", Scene("red", "left", True)) == "a toy on the left, red background, with a ball"
    assert caption("toy", Scene("blue", "right", False)) == "a toy on the right, blue background"
    assert pair_caption("toy", "pet", "green") == "a toy on the left and a pet on the right, green background"
    for word in ("ball", "two words", ""):
        with pytest.raises(ValueError):
            caption(word, Scene("red", "left", True))
    with pytest.raises(ValueError):
        pair_caption("toy", "toy", "green")


def test_scorer_passes_its_validation(validation):
    scorer.check_validated(validation)
    assert all(accuracy >= 0.95 for accuracy in validation.ground_truth.values())
    assert all(accuracy >= 0.90 for accuracy in validation.degraded.values())
    assert abs(validation.noise["identity"] - 1 / len(IDENTITIES)) <= validation.band["identity"] < 0.1
    assert validation.blank["side"] == 0 and validation.blank["identity"] == 0


def cheating_image(original):
    def score(image, identities, expected=None):
        honest = original(image, identities, expected)
        return scorer.ImageScore(honest.background, honest.side, honest.ball, identities.index(expected), 0.0, 0.0)
    return score


def cheating_pair(image, identities, left, right):
    return scorer.PairScore(True, True, False, False)


@pytest.mark.parametrize("name, replacement, failures", [
    ("score_image", cheating_image(scorer.score_image), ["noise identity"]),
    ("score_pair", cheating_pair, ["noise pair_identity", "ground truth pair_no_leak", "blank pair_identity"]),
])
def test_a_cheating_scorer_fails_validation(monkeypatch, name, replacement, failures):
    monkeypatch.setattr(scorer, name, replacement)
    validation = scorer.validate(IDENTITIES, seed=1, images_per_identity=6)
    assert not validation.passed
    with pytest.raises(RuntimeError) as raised:
        scorer.check_validated(validation)
    for failure in failures:
        assert failure in str(raised.value)


def test_a_view_is_scored_as_the_identity_drawn_not_the_one_expected():
    rng = np.random.default_rng(4)
    drawn, expected = IDENTITIES[3], IDENTITIES[9]
    scene = Scene("yellow", "right", True)
    image, _ = draw(drawn, scene, rng)
    score = scorer.score_image(image, IDENTITIES, expected=expected)
    assert (score.background, score.side, score.ball, score.identity) == ("yellow", "right", True, 3)
    assert score.identity_distance == 0 and score.own_distance > 0.3
    as_float = scorer.score_image(image.astype(np.float32) / 255, IDENTITIES, expected=expected)
    assert as_float.identity == 3 and as_float.own_distance == pytest.approx(score.own_distance, abs=1e-6)


def test_blurred_noisy_views_keep_their_part_colours():
    """Parts are measured away from their blurred edges: the mean distance is 0.04 (0.27 from whole quarters)."""
    rng = np.random.default_rng(8)
    distances = []
    for identity, scene in zip(IDENTITIES * 4, scenes() * 4):
        image, _ = draw(identity, scene, rng)
        assert scorer.score_image(image, IDENTITIES).identity_distance == 0
        distances.append(scorer.score_image(scorer.degrade(image, rng), IDENTITIES).identity_distance)
    assert np.mean(distances) < 0.08


def test_leak_is_a_part_of_the_other_identity():
    rng = np.random.default_rng(5)
    left, right = IDENTITIES[0], IDENTITIES[1]
    position = next(p for p in range(4) if left.parts[p] != right.parts[p])
    blended = Identity(left.index, tuple(right.parts[p] if p == position else left.parts[p] for p in range(4)))
    clean = scorer.score_pair(draw_pair(left, right, "red", rng)[0], IDENTITIES, left, right)
    assert clean == scorer.PairScore(True, True, False, False)
    leaked = scorer.score_pair(draw_pair(blended, right, "red", rng)[0], IDENTITIES, left, right)
    assert leaked.left_leak and not leaked.right_leak and leaked.right_identity_correct


def test_pictures_without_a_subject_do_not_crash():
    blank = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array(BACKGROUNDS["green"], np.uint8)
    score = scorer.score_image(blank, IDENTITIES, expected=IDENTITIES[0])
    assert (score.background, score.side, score.ball, score.identity) == ("green", None, False, None)
    assert np.isnan(score.own_distance)
    noise = np.random.default_rng(6).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert scorer.score_image(noise, IDENTITIES).background in BACKGROUNDS
    assert scorer.score_pair(blank, IDENTITIES, IDENTITIES[0], IDENTITIES[1]) == scorer.PairScore(False, False, False,
                                                                                                 False)
