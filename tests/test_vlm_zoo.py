"""The VLM zoo: a separate, cached zoo beside the text zoo; held-out pictures; the skills it is built to have."""

from __future__ import annotations

import json
import random

import numpy as np

from evomerge.evaluate import Evaluator, load_causal_lm, load_task
from evomerge.zoo.builder import source_digest
from evomerge.zoo.vlm import build_vlm_zoo, default_vlm_zoo_dir
from evomerge.zoo.vlm.scenes import GRID, MAX_OBJECTS, answer, draw_scene, render
from evomerge.zoo.vlm.train import make_processor, visual_batch


def test_a_scene_is_drawn_as_its_squares():
    scene = ((0, "r"), (5, "u"), (15, "v"))
    image = render(scene)
    assert image.shape == (16, 16, 3) and answer(scene, "n") == 3
    lit = [(cell // GRID, cell % GRID) for cell in range(16) if not np.all(image[(cell // GRID) * 4, (cell % GRID) * 4] == 24)]
    assert lit == [(0, 0), (1, 1), (3, 3)]
    assert tuple(image[0, 0]) == (220, 40, 40) and tuple(image[3, 3]) == (24, 24, 24)  # the one-pixel margin
    counts = {len(draw_scene(random.Random(i))) for i in range(300)}
    assert counts == set(range(1, MAX_OBJECTS + 1))


def test_training_never_draws_a_held_out_scene(zoo):
    from transformers import PreTrainedTokenizerFast

    processor = make_processor(PreTrainedTokenizerFast.from_pretrained(zoo.base))
    # Hold out the very scenes the training stream draws first: rejected draws consume no question, so
    # the stream's first 40 scenes are exactly these, and every one must be skipped.
    peek = random.Random(0)
    held_out = [draw_scene(peek) for _ in range(40)]
    input_ids, labels, pixels = visual_batch(random.Random(0), frozenset(held_out), 32, processor)
    assert pixels.shape == (32, 3, 16, 16) and input_ids.shape[0] == 32
    forbidden = processor.image_processor(images=[render(scene) for scene in held_out], return_tensors="pt")["pixel_values"]
    for picture in pixels:
        assert not any(np.array_equal(picture.numpy(), other.numpy()) for other in forbidden)
    # The answers are the counts of the pictures actually drawn (the first label after the prompt).
    answers = [processor.tokenizer.convert_ids_to_tokens(int(row[labels[i] != -100][0])) for i, row in enumerate(input_ids)]
    assert all(a.isdigit() and 1 <= int(a) <= MAX_OBJECTS for a in answers)


def test_the_vlm_zoo_is_its_own_cache_and_leaves_the_text_zoo_alone(vlm_zoo, zoo):
    assert vlm_zoo.root == default_vlm_zoo_dir(zoo.manifest["seed"]) or vlm_zoo.root.parent == zoo.root.parent
    assert vlm_zoo.text.root == zoo.root
    # The text zoo's digest covers only its own modules: the VLM zoo's code is not among them.
    assert json.loads((zoo.root / "zoo.json").read_text())["build"]["source_sha256"] == source_digest()
    assert build_vlm_zoo(seed=zoo.manifest["seed"], text_zoo_dir=zoo.root).manifest == vlm_zoo.manifest


def test_evaluation_pictures_are_distinct_across_all_tasks_and_splits(vlm_zoo):
    digests = [
        image.digest
        for name in ("vqa", "vqa_l2", "target")
        for split in ("search", "test")
        for image in load_task(vlm_zoo.tasks[name]).images(split)
        if image is not None
    ]
    assert len(digests) == len(set(digests))


def test_the_vlm_counts_in_language_1_and_the_target_needs_both_parents(vlm_zoo):
    model, processor = load_causal_lm(vlm_zoo.vlm)
    tasks = [load_task(vlm_zoo.tasks[name]) for name in ("vqa", "target")]
    report = Evaluator(processor, tasks, "test").evaluate(model)
    assert report["vqa"].score > 0.9
    # The target's picture half is answerable by the VLM, its language-2 half is not.
    target = tasks[1]
    visual = [v for v, image in zip(report["target"].values, target.images("test"), strict=True) if image is not None]
    text = [v for v, image in zip(report["target"].values, target.images("test"), strict=True) if image is None]
    assert len(visual) == len(text)
    assert np.mean(visual) > 0.9
    # The text half is the first rows of the text zoo's translate test split: the language specialist
    # writes them far better than the VLM, whose language model is the base's, lightly fine-tuned.
    specialist, tokenizer = load_causal_lm(vlm_zoo.language)
    translate = Evaluator(tokenizer, [load_task(vlm_zoo.text.tasks["translate"])], "test").evaluate(specialist, limit=len(text))
    assert translate["translate"].score > np.mean(text) + 0.2
