"""Image-grounded tasks: loading and checking images, the processor-batched engine, `evomerge eval` on a VLM."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from evomerge.cli import run
from evomerge.errors import TaskError
from evomerge.evaluate import Evaluator, load_causal_lm, load_task

MAX_NEW = 6


def picture(seed: int, size: int = 16) -> Image.Image:
    """A seeded random RGB picture (every seed a different image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_image_task(root: Path, search: list[dict], test: list[dict], **extra) -> Path:
    """A task with `image` rows; `{"seed": s}` rows get a PNG file, `{"b64": s}` rows inline base64."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, rows in (("search", search), ("test", test)):
        with (root / f"{split}.jsonl").open("w") as handle:
            for i, row in enumerate(rows):
                row = dict(row)
                if "seed" in row:
                    name = f"images/{split}{i}.png"
                    picture(row.pop("seed")).save(root / name)
                    row["image"] = name
                elif "b64" in row:
                    row["image"] = png_base64(picture(row.pop("b64")))
                handle.write(json.dumps({"question": f"q{i}", "answer": str(i % 10), **row}) + "\n")
    spec = {
        "name": "vqa", "data": {"search": "search.jsonl", "test": "test.jsonl"}, "prompt": "{question}=",
        "answer_field": "answer", "scorer": "exact", "image_field": "image",
        "generation": {"max_new_tokens": MAX_NEW, "stop": ["\n"]}, **extra,
    }
    path = root / "vqa.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_images_load_from_paths_and_base64_and_enter_the_fingerprint(tmp_path):
    task = load_task(write_image_task(tmp_path, [{"seed": 1}, {"b64": 2}], [{"seed": 3}]))
    assert [im.image.size for im in task.images("search")] == [(16, 16), (16, 16)]
    assert np.array_equal(np.asarray(task.images("search")[1].image), np.asarray(picture(2)))
    other = load_task(write_image_task(tmp_path / "b", [{"seed": 1}, {"b64": 2}], [{"seed": 4}]))
    assert task.fingerprint() != other.fingerprint()  # same rows and task file, another test image


@pytest.mark.parametrize(
    ("search", "test", "expected"),
    [
        ([{"seed": 1}, {"image": "images/none.png"}], [{"seed": 3}], "search example 2: image file .*none.png does not exist"),
        ([{"seed": 1}], [{"image": "data:image/png;base64,@@@"}], "test example 1: the image data URL is not valid base64"),
        ([{"seed": 1}], [{"image": 7}], "test example 1: the image field must be a file path or a base64 PNG"),
        # The same picture in both splits, once as a file and once inline: caught by its pixels.
        ([{"seed": 1}, {"seed": 2}], [{"b64": 2}], "test example 1 has the same image as search example 2"),
        ([{"seed": 1}], [{"question": "x", "answer": "1"}], "test example 1 has no field 'image'"),
    ],
)
def test_bad_image_rows_fail_in_one_sentence(tmp_path, search, test, expected):
    path = write_image_task(tmp_path, search, test)
    with pytest.raises(TaskError, match=expected) as caught:
        load_task(path)
    assert str(caught.value).count(". ") == 0 and str(path) in str(caught.value)


def test_a_corrupt_image_file_is_refused(tmp_path):
    path = write_image_task(tmp_path, [{"seed": 1}], [{"seed": 2}])
    (tmp_path / "images" / "test0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(TaskError, match=r"test example 1: image file .*test0.png is not a readable image"):
        load_task(path)


def test_fewshot_with_images_is_refused(tmp_path):
    with pytest.raises(TaskError, match="fewshot must be 0 for a task with an image_field"):
        load_task(write_image_task(tmp_path, [{"seed": 1}, {"seed": 2}], [{"seed": 3}], fewshot=1))


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process and return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_eval_exits_2_naming_the_missing_image(tmp_path, tiny_vlm, monkeypatch, capsys):
    path = write_image_task(tmp_path, [{"seed": 1}, {"image": "images/gone.png"}], [{"seed": 3}])
    code, _, err = invoke(monkeypatch, capsys, "eval", str(tiny_vlm), "--task", str(path))
    assert code == 2 and "gone.png does not exist" in " ".join(err.split())


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    return load_causal_lm(tiny_vlm)


def _reference(model, processor, prompt: str, image: Image.Image | None) -> list[int]:
    if image is None:
        inputs = processor.tokenizer(prompt, return_tensors="pt")
    else:
        inputs = processor(images=[image], text=[processor.image_token + prompt], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_processor_batched_greedy_matches_generate_per_example(tmp_path, vlm):
    model, processor = vlm
    # Prompts of different lengths, so left padding varies inside each batch of 4.
    search = [{"seed": 10 + i, "question": "7" * (1 + i % 5)} for i in range(9)]
    task = load_task(write_image_task(tmp_path, search, [{"seed": 99}], generation={"max_new_tokens": MAX_NEW}))
    produced = Evaluator(processor, [task], batch_size=4).generate(model, "vqa", range(9))
    references = [
        _reference(model, processor, prompt, image.image)
        for prompt, image in zip(task.prompts("search"), task.images("search"), strict=True)
    ]
    assert [produced[i].ids for i in range(9)] == references
    # The image matters: the same prompts with other pictures do not all continue alike.
    assert len({tuple(ids) for ids in references}) > 1


def test_text_only_rows_of_an_image_task_batch_with_image_rows(tmp_path, vlm):
    model, processor = vlm
    search = [{"seed": 30 + i} if i % 2 else {"image": None, "question": f"{i}+{i}"} for i in range(7)]
    task = load_task(write_image_task(tmp_path, search, [{"image": None, "question": "9+9"}]))
    assert [image is None for image in task.images("search")] == [i % 2 == 0 for i in range(7)]
    produced = Evaluator(processor, [task], batch_size=7).generate(model, "vqa", range(7))
    for i, (prompt, image) in enumerate(zip(task.prompts("search"), task.images("search"), strict=True)):
        assert produced[i].ids == _reference(model, processor, prompt, image and image.image), i


def test_text_only_rows_are_still_checked_for_overlap_by_prompt(tmp_path):
    path = write_image_task(tmp_path, [{"image": None, "question": "1+1"}], [{"image": None, "question": "1+1"}])
    with pytest.raises(TaskError, match="search and test splits overlap in 1 example"):
        load_task(path)


def test_image_tasks_score_with_every_scorer_kind(tmp_path, vlm):
    model, processor = vlm
    rows = [{"seed": 20 + i, "choices": ["1", "2"], "answer": "1"} for i in range(4)]
    generative = load_task(write_image_task(tmp_path / "g", rows, [{"seed": 50}], response_charset="[0-9]"))
    choice = load_task(
        write_image_task(tmp_path / "c", rows, [{"seed": 51, "choices": ["1", "2"], "answer": "2"}],
                         name="choice", scorer="choice", scorer_args={"choices_field": "choices"})
    )
    report = Evaluator(processor, [generative, choice]).evaluate(model)
    assert report["vqa"].n == 4 and report["choice"].n == 4
    # Independent check of the choice scores: log-likelihood of each choice after the image prompt.
    expected = []
    for prompt, image in zip(choice.prompts("search"), choice.images("search"), strict=True):
        inputs = processor(images=[image.image], text=[processor.image_token + prompt], return_tensors="pt")
        logits = model(**inputs).logits[0, -1].log_softmax(-1)
        ids = [processor.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in ("1", "2")]
        expected.append(1.0 if logits[ids[0]] > logits[ids[1]] else 0.0)
    assert report["choice"].values == expected


def test_an_image_task_needs_a_processor(tmp_path, vlm):
    _, processor = vlm
    task = load_task(write_image_task(tmp_path, [{"seed": 1}], [{"seed": 2}]))
    with pytest.raises(TaskError, match="task 'vqa' has images; evaluate it with an image-text model"):
        Evaluator(processor.tokenizer, [task])


def test_cli_eval_scores_a_vlm_on_an_image_task(tmp_path, tiny_vlm, vlm, monkeypatch, capsys):
    path = write_image_task(tmp_path, [{"seed": i} for i in range(3)], [{"seed": 9}])
    out = tmp_path / "scores.json"
    code, _, err = invoke(monkeypatch, capsys, "eval", str(tiny_vlm), "--task", str(path), "--out", str(out))
    assert code == 0, err
    model, processor = vlm
    with torch.no_grad():
        direct = Evaluator(processor, [load_task(path)]).evaluate(model)
    assert json.loads(out.read_text())["tasks"]["vqa"]["values"] == direct["vqa"].values


def test_an_image_prompt_longer_than_the_language_models_context_is_refused(tmp_path, vlm):
    model, processor = vlm
    # 4 image tokens + 120 prompt characters + "=" + 6 new tokens > the tiny Llava's 128 positions.
    task = load_task(write_image_task(tmp_path, [{"seed": 1, "question": "7" * 120}], [{"seed": 2}]))
    with pytest.raises(TaskError, match="search example 1 needs 125 prompt tokens \\+ 6 new tokens, more than the model's context of 128"):
        Evaluator(processor, [task]).evaluate(model)


def test_answer_probabilities_of_image_and_text_rows_match_unpadded_forwards(tmp_path, vlm):
    """Reference-answer probabilities (`fitness.anchor_answers: likelihood`) on a mixed image task, batched:
    each equals one forward of the processor's own inputs with the answer and stop appended."""
    model, processor = vlm
    search = [{"seed": 50 + i, "question": "7" * (1 + i % 3)} if i % 2 else {"image": None, "question": f"{i}+{i}"}
              for i in range(6)]
    task = load_task(write_image_task(tmp_path, search, [{"seed": 98}]))
    report = Evaluator(processor, [task], batch_size=4).answer_probabilities(model, {"vqa": range(6)})
    tokenizer = processor.tokenizer
    for i, (prompt, image, answer) in enumerate(
        zip(task.prompts("search"), task.images("search"), task.answers("search"), strict=True)
    ):
        if image is None:
            context = tokenizer(prompt)["input_ids"]
            whole = tokenizer(prompt + answer + "\n")["input_ids"]
            inputs = {"input_ids": torch.tensor([whole])}
        else:
            encoded = processor(images=[image.image], text=[processor.image_token + prompt], return_tensors="pt")
            context = encoded["input_ids"][0].tolist()
            whole = context + tokenizer(answer + "\n", add_special_tokens=False)["input_ids"]
            inputs = {"input_ids": torch.tensor([whole]), "pixel_values": encoded["pixel_values"]}
        with torch.no_grad():
            logits = model(**inputs).logits[0].log_softmax(-1)
        expected = float(torch.tensor(sum(float(logits[t - 1, whole[t]]) for t in range(len(context), len(whole)))).exp())
        assert report["vqa"].values[i] == pytest.approx(expected, rel=1e-4), i
