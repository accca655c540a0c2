"""Synthetic tasks: answers are checked against the rendered pixels, not against the generator's own scene."""

from collections import deque

import numpy as np
import pytest

from scout_mm.train.synthetic import COLORS, RELATIONS, SHAPES, TASKS, WORDS, SyntheticTasks, is_heldout

PALETTE = {rgb: name for name, rgb in COLORS.items()}
PER_TASK = 12


def components(image) -> list[dict]:
    """Connected regions of exact palette colours (shapes are drawn without antialiasing; text is not)."""
    pixels = np.asarray(image)
    height, width, _ = pixels.shape
    colour_of = {}
    for rgb, name in PALETTE.items():
        for y, x in zip(*np.nonzero(np.all(pixels == rgb, axis=-1))):
            colour_of[(int(y), int(x))] = name
    seen, regions = set(), []
    for start, name in colour_of.items():
        if start in seen:
            continue
        seen.add(start)
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (ny, nx) not in seen and colour_of.get((ny, nx)) == name:
                    seen.add((ny, nx))
                    queue.append((ny, nx))
        if len(members) >= 30:  # ignore stray text pixels that happen to hit a palette colour
            ys, xs = np.array(members).T
            regions.append({"color": name, "y": ys, "x": xs, "cx": xs.mean(), "cy": ys.mean()})
    return regions


def classify(region) -> str:
    """Shape from the filled share of its bounding box and its top-heaviness."""
    ys, xs = region["y"], region["x"]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (h * w)
    middle = ys.min() + h / 2
    top, bottom = (ys < middle).sum(), (ys >= middle).sum()
    if fill > 0.9:
        return "square"
    if top < 0.6 * bottom:
        return "triangle"
    if fill > 0.7:
        return "circle"
    if fill > 0.5:
        return "cross"
    return "star"


def region_at(regions, shape):
    return next(r for r in regions if ((r["y"] == shape.cy) & (r["x"] == shape.cx)).any())


@pytest.fixture(scope="module")
def samples():
    tasks = SyntheticTasks("train", seed=0)
    return [tasks[i] for i in range(PER_TASK * len(TASKS))]


def test_every_task_is_drawn_equally(samples):
    assert sorted({s.task for s in samples}) == sorted(TASKS)
    assert all(sum(s.task == t for s in samples) == PER_TASK for t in TASKS)


def test_answers_match_the_rendered_pixels(samples):
    for sample in samples:
        image = sample.render()
        assert image.size == (sample.scene.width, sample.scene.height)
        regions = components(image)
        shapes = sample.scene.shapes
        if sample.task == "count":
            assert sample.answer == str(len(regions)), sample
        elif sample.task == "color":
            kind = sample.question.removeprefix("What color is the ").removesuffix("?")
            (target,) = [s for s in shapes if s.kind == kind]
            assert region_at(regions, target)["color"] == sample.answer
        elif sample.task == "shape":
            colour = sample.question.removeprefix("What shape is ").removesuffix("?")
            (region,) = [r for r in regions if r["color"] == colour]
            assert classify(region) == sample.answer, sample
        elif sample.task == "describe":
            ordered = sorted(regions, key=lambda r: r["cx"])
            seen = [f"a {r['color']} {classify(r)}" for r in ordered]
            expected = sample.answer.replace(" and ", ", ").split(", ")
            assert seen == expected, sample
        elif sample.task == "position":
            a, b = (region_at(regions, s) for s in shapes)
            dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
            seen = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
            assert sample.answer == seen and seen in RELATIONS
            assert f"the {a['color']} " in sample.question and f"the {b['color']} " in sample.question
        elif sample.task == "read":
            assert sample.answer in WORDS and sample.answer == sample.scene.words[0].text
            dark = (np.asarray(image).max(axis=-1) < 140).sum()  # the word's strokes
            assert dark > 100


def test_shape_classifier_sees_every_shape(samples):
    # Guards the pixel check above: every shape kind was recognised at least once.
    found = {
        classify(region_at(components(s.render()), shape))
        for s in samples
        if s.task == "describe"
        for shape in s.scene.shapes
    }
    assert found == set(SHAPES)


def test_heldout_split_is_disjoint_and_deterministic():
    train, heldout = SyntheticTasks("train", seed=3), SyntheticTasks("heldout", seed=3)
    train_keys = {(s.question, s.scene.key()) for s in (train[i] for i in range(300))}
    held = [heldout[i] for i in range(60)]
    assert all(is_heldout(s) for s in held)
    assert not any(is_heldout(train[i]) for i in range(300))
    assert train_keys.isdisjoint({(s.question, s.scene.key()) for s in held})
    again = SyntheticTasks("heldout", seed=3)
    assert [again[i] for i in range(5)] == held[:5]
    assert np.array_equal(np.asarray(again[4].render()), np.asarray(held[4].render()))
    assert SyntheticTasks("train", seed=4)[0] != train[0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split='test'"):
        SyntheticTasks("test")
    with pytest.raises(ValueError, match="'colour'"):
        SyntheticTasks("train", tasks=["colour"])
