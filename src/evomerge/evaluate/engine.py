"""The evaluation engine: pre-tokenised prompts, batched greedy generation / log-likelihood, scores.

The `Evaluator` holds only things derived from the *tokenizer and tasks* (token ids, sort orders).
Nothing derived from model weights is kept, because the search overwrites the model's weights in
place between calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from evomerge.errors import TaskError
from evomerge.evaluate.decoding import Generated, continuation_logprobs, greedy_generate
from evomerge.evaluate.report import EvalReport, TaskScore, mean_and_stderr
from evomerge.evaluate.scorers import GenerativeScorer, LoglikScorer, choice_index, truncate_at_stop
from evomerge.evaluate.task import Task, check_split


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the speed/accuracy sweet spot for evaluation), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class _Prepared:
    """Token ids of one task's split, computed once per Evaluator."""

    task: Task
    prompt_ids: list[list[int]]
    # For log-likelihood tasks: per example, the (context, continuation) id pairs to score.
    requests: list[list[tuple[list[int], list[int]]]]
    # Image tasks: the processor's pixel values per example (None for a text-only one), made once.
    pixel_values: list[torch.Tensor | None] | None = None

    def pixels(self, chosen: Sequence[int]) -> torch.Tensor | None:
        """The pixel values of the examples in `chosen` that have an image, in that order (the model
        matches them to the image placeholders in row order), or None when none has one."""
        images = [self.pixel_values[i] for i in chosen if self.pixel_values[i] is not None] if self.pixel_values else []
        return torch.stack(images) if images else None

    @cached_property
    def longest(self) -> tuple[int, int]:
        """(example index, tokens the model must read) of the split's longest example, computed once:
        `evaluate` checks it against the model's context on every call (racing calls it per round)."""
        lengths = [len(ids) for ids in self.prompt_ids] or [
            max(len(ctx) + len(cont) for ctx, cont in pairs) for pairs in self.requests
        ]
        index = max(range(len(lengths)), key=lengths.__getitem__)
        return index, lengths[index]


class Evaluator:
    """Evaluate models on tasks with pre-tokenised prompts and batched, KV-cached greedy decoding.

    `tokenizer` is the model's tokenizer, or for an image-text model its processor (`AutoProcessor`):
    then image tasks are preprocessed by it once (placeholder tokens expanded, pixel values made) and
    text is tokenised by its tokenizer.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | ProcessorMixin,
        tasks: Sequence[Task],
        split: str = "search",
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("an Evaluator needs at least one task")
        names = [task.name for task in tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise TaskError(f"task names must be unique, but {', '.join(map(repr, duplicates))} is used by several task files")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.processor = tokenizer if isinstance(tokenizer, ProcessorMixin) else None
        self.tokenizer: PreTrainedTokenizerBase = tokenizer.tokenizer if self.processor else tokenizer
        tokenizer = self.tokenizer
        self.split = check_split(split)
        self.device = torch.device(device)
        self.batch_size = batch_size
        # None: bf16 on CUDA (cast in place on first use), the model's own dtype elsewhere.
        self.dtype = dtype if dtype is not None or self.device.type != "cuda" else torch.bfloat16
        self._pad_id = _pad_id(tokenizer)
        self._eos_ids = _eos_ids(tokenizer)
        self._prepared = {task.name: self._prepare(task) for task in tasks}
        self._references: dict[str, list[tuple[list[int], list[int]]]] = {}

    @property
    def tasks(self) -> list[Task]:
        """The tasks, in the order given."""
        return [prepared.task for prepared in self._prepared.values()]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Encode the whole string and split at the context length, so the continuation's tokens are
        # those the model would see (BPE merges across the boundary are respected when possible).
        ctx = self._encode(context)
        whole = self._encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            cont = whole[len(ctx) :]
        else:
            cont = self._encode_plain(continuation)
        return ctx or self._start_ids(), cont

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _start_ids(self) -> list[int]:
        # An empty prompt still needs one token for the first prediction to condition on.
        bos = self.tokenizer.bos_token_id
        return [bos if bos is not None else self._pad_id]

    def _image_prompts(
        self, task: Task, prompts: list[str]
    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Each prompt's ids with its image's placeholder tokens expanded, and its pixel values (a
        text-only example: its plain ids and None).

        The processor's image token is put in front of a prompt that does not place it itself.
        """
        if self.processor is None or getattr(self.processor, "image_processor", None) is None:
            raise TaskError(
                f"task {task.name!r} has images; evaluate it with an image-text model whose directory has an "
                "image processor (AutoProcessor)"
            )
        token = self.processor.image_token
        ids, pixels = [], []
        for prompt, image in zip(prompts, task.images(self.split), strict=True):
            if image is None:
                ids.append(self._encode(prompt) or self._start_ids())
                pixels.append(None)
                continue
            text = prompt if token in prompt else token + prompt
            encoded = self.processor(images=[image.image], text=[text], return_tensors="pt")
            ids.append(encoded["input_ids"][0].tolist())
            pixels.append(encoded["pixel_values"][0])
        return ids, pixels

    def _prepare(self, task: Task) -> _Prepared:
        prompts = task.prompts(self.split)
        scorer = task.scorer
        image_ids, pixels = self._image_prompts(task, prompts) if task.has_images else (None, None)
        requests: list[list[tuple[list[int], list[int]]]] = []
        if isinstance(scorer, LoglikScorer):
            for index, (prompt, row) in enumerate(zip(prompts, task.examples(self.split), strict=True)):
                if scorer.mode == "choice":
                    conts = [str(choice) for choice in row[scorer.choices_field or ""]]
                else:
                    conts = [str(row[task.spec.answer_field])]
                if pixels is not None and pixels[index] is not None:
                    # The image placeholders are special tokens: no merge can cross into the answer.
                    pairs = [(image_ids[index], self._encode_plain(cont)) for cont in conts]
                else:
                    pairs = [self._pair(prompt, cont) for cont in conts]
                if any(not cont for _, cont in pairs):
                    raise TaskError(
                        f"task {task.name!r}: {self.split} example {len(requests) + 1} has an empty answer or "
                        "choice to score (it would tokenise to nothing)"
                    )
                requests.append(pairs)
            return _Prepared(task, [], requests, pixels)
        if image_ids is not None:
            return _Prepared(task, image_ids, [], pixels)
        return _Prepared(task, [self._encode(prompt) or self._start_ids() for prompt in prompts], [])

    def _place(self, model: PreTrainedModel) -> PreTrainedModel:
        """Move/cast the model in place only when it is not already on our device/dtype."""
        param = next(model.parameters())
        # "cuda" means the current CUDA device: compare the index only when one was given.
        wrong_device = param.device.type != self.device.type or (
            self.device.index is not None and param.device.index != self.device.index
        )
        if wrong_device or (self.dtype is not None and param.dtype != self.dtype):
            model.to(device=self.device, dtype=self.dtype)
        return model.eval()

    def evaluate(
        self,
        model: PreTrainedModel,
        *,
        indices: Mapping[str, Sequence[int]] | None = None,
        limit: int | None = None,
    ) -> EvalReport:
        """Score `model`: every task on all examples, or on the first `limit`, or only the tasks named in
        `indices` on exactly those example indices (a task with an empty list is skipped; this is what
        racing needs to evaluate "the rest" of some tasks only).
        """
        if indices is not None and limit is not None:
            raise ValueError("pass either indices or limit, not both")
        selection = self._selection(indices, limit)
        self._check_context(model)
        started = time.perf_counter()
        model = self._place(model)
        scores = {}
        for name, chosen in selection.items():
            scores[name] = self._score_task(model, self._prepared[name], chosen)
        return EvalReport(self.split, scores, time.perf_counter() - started)

    def answer_probabilities(
        self, model: PreTrainedModel, indices: Mapping[str, Sequence[int]], *, against_rival: bool = False,
        zero_if_lost: bool = False,
    ) -> EvalReport:
        """Per chosen example of each generative task, the probability that the model writes the reference
        answer and then stops (at the task's first stop string, or EOS), teacher-forced: one forward pass,
        no generation. A graded signal where greedy answers are 0/1 (`fitness.anchor_answers: likelihood`).
        `against_rival`: the product over the answer's tokens of p(token) / (p(token) + p(strongest other
        token)), a graded version of whether greedy decoding writes the reference (`anchor_answers: margin`;
        `decoding.continuation_logprobs`).
        """
        selection = self._selection(indices, None)
        for name in selection:
            if not isinstance(self._prepared[name].task.scorer, GenerativeScorer):
                raise TaskError(f"task {name!r} is scored by log-likelihood; answer probabilities are for generative tasks")
        self._check_context(model)
        started = time.perf_counter()
        model = self._place(model)
        scores = {}
        for name, chosen in selection.items():
            task_started = time.perf_counter()
            prepared = self._prepared[name]
            pairs = self._reference_pairs(prepared)
            logprob: dict[int, float] = {}
            for batch in self._batches(chosen, [len(ctx) + len(cont) for ctx, cont in pairs]):
                logprob.update(zip(batch, continuation_logprobs(
                    model, [pairs[i] for i in batch], pad_id=self._pad_id, pixel_values=prepared.pixels(batch),
                    against_rival=against_rival, zero_if_lost=zero_if_lost,
                ), strict=True))
            values = [math.exp(logprob[i]) for i in chosen]
            score, stderr = mean_and_stderr(values)
            scores[name] = TaskScore(
                task=name, score=score, stderr=stderr, n=len(values), values=values, indices=chosen,
                prompt_tokens=sum(len(pairs[i][0]) + len(pairs[i][1]) for i in chosen), generated_tokens=0,
                seconds=time.perf_counter() - task_started, outputs=[],
            )
        return EvalReport(self.split, scores, time.perf_counter() - started)

    def _reference_pairs(self, prepared: _Prepared) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reference answer + stop ids) per example of a generative task, made once."""
        cached = self._references.get(prepared.task.name)
        if cached is not None:
            return cached
        task = prepared.task
        stop = next((s for s in task.spec.generation.stop if s), None)
        end = self._eos_ids[:1] if stop is None else []
        pairs = []
        rows = zip(prepared.prompt_ids, task.prompts(self.split), task.answers(self.split), strict=True)
        for index, (prompt_ids, prompt, answer) in enumerate(rows):
            text = str(answer[0] if isinstance(answer, list) else answer) + (stop or "")
            if prepared.pixel_values and prepared.pixel_values[index] is not None:
                # Image placeholders are special tokens: no merge crosses into the answer.
                pairs.append((prompt_ids, self._encode_plain(text) + end))
            else:
                context, continuation = self._pair(prompt, text)
                pairs.append((context, continuation + end))
        self._references[task.name] = pairs
        return pairs

    def _check_context(self, model: PreTrainedModel) -> None:
        """Refuse, before any work, an example longer than the model can read: a too-long prompt would
        otherwise fail deep inside attention or grow memory until the kernel kills the process."""
        # An image-text model's context is its language model's (Llava's config nests it in text_config).
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if not context:
            return
        for prepared in self._prepared.values():
            new_tokens = prepared.task.spec.generation.max_new_tokens if prepared.prompt_ids else 0
            index, tokens = prepared.longest
            if tokens + new_tokens > context:
                raise TaskError(
                    f"task {prepared.task.name!r}: {self.split} example {index + 1} needs {tokens} prompt "
                    f"tokens + {new_tokens} new tokens, more than the model's context of {context}"
                )

    def _selection(
        self, indices: Mapping[str, Sequence[int]] | None, limit: int | None
    ) -> dict[str, list[int]]:
        """The example indices to evaluate, per task (validated before any model work starts)."""
        sizes = {name: len(prepared.task.examples(self.split)) for name, prepared in self._prepared.items()}
        if indices is None:
            return {
                name: list(range(size if limit is None else min(limit, size))) for name, size in sizes.items()
            }
        unknown = sorted(set(indices) - set(sizes))
        if unknown:
            raise ValueError(f"indices name unknown tasks {unknown}; tasks are {sorted(sizes)}")
        selection = {}
        for name, wanted in indices.items():
            chosen = [int(i) for i in wanted]
            bad = [i for i in chosen if not 0 <= i < sizes[name]]
            if bad:
                raise ValueError(f"task {name!r}: indices {bad[:3]} outside 0..{sizes[name] - 1}")
            if chosen:
                selection[name] = chosen
        return selection

    def _score_task(self, model: PreTrainedModel, prepared: _Prepared, chosen: list[int]) -> TaskScore:
        started = time.perf_counter()
        task = prepared.task
        if isinstance(task.scorer, GenerativeScorer):
            values, outputs, prompt_tokens, generated = self._generate_and_score(model, prepared, chosen)
        else:
            values, prompt_tokens = self._loglik_values(model, prepared, chosen)
            outputs, generated = [], 0
        score, stderr = mean_and_stderr(values)
        return TaskScore(
            task=task.name,
            score=score,
            stderr=stderr,
            n=len(values),
            values=values,
            indices=chosen,
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            seconds=time.perf_counter() - started,
            outputs=outputs,
        )

    def _batches(self, chosen: list[int], lengths: Sequence[int]) -> list[list[int]]:
        # Longest first: similar lengths share a batch (little padding), and an out-of-memory batch
        # shows up on the first step rather than at the end.
        order = sorted(chosen, key=lambda i: -lengths[i])
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def generate(self, model: PreTrainedModel, task: str, chosen: Sequence[int]) -> dict[int, Generated]:
        """Raw greedy token ids (EOS excluded, ending at the first stop string hit) per chosen example."""
        prepared = self._prepared[task]
        spec = prepared.task.spec.generation
        stops = [s for s in spec.stop if s]
        window = max((len(s) for s in stops), default=0) + 2

        def stop_hit(tail: list[int]) -> bool:
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            return any(s in text for s in stops)

        model = self._place(model)
        lengths = [len(ids) for ids in prepared.prompt_ids]
        # Like `generate`: the model's generation config decides; the tokenizer's EOS is the fallback.
        eos_ids = _model_eos_ids(model) or self._eos_ids
        results: dict[int, Generated] = {}
        for batch in self._batches(list(chosen), lengths):
            outs = greedy_generate(
                model,
                [prepared.prompt_ids[i] for i in batch],
                max_new_tokens=spec.max_new_tokens,
                eos_ids=eos_ids,
                pad_id=self._pad_id,
                stop_hit=stop_hit if stops else None,
                stop_window=window,
                pixel_values=prepared.pixels(batch),
            )
            results.update(zip(batch, outs, strict=True))
        return results

    def _generate_and_score(
        self, model: PreTrainedModel, prepared: _Prepared, chosen: list[int]
    ) -> tuple[list[float], list[str], int, int]:
        task = prepared.task
        stops = task.spec.generation.stop
        produced = self.generate(model, task.name, chosen)
        answers = task.answers(self.split)
        values, outputs = [], []
        for i in chosen:
            text = truncate_at_stop(self.tokenizer.decode(produced[i].ids, skip_special_tokens=True), stops)
            outputs.append(text)
            values.append(
                task.scorer.score(
                    text, answers[i], charset=task.charset, response_charset=task.response_charset,
                    response_language=task.response_language,
                )
            )
        prompt_tokens = sum(len(prepared.prompt_ids[i]) for i in chosen)
        # Count every token the model produced, the final EOS included (throughput accounting).
        generated = sum(len(produced[i].ids) + (produced[i].stopped_by == "eos") for i in chosen)
        return values, outputs, prompt_tokens, generated

    def _loglik_values(
        self, model: PreTrainedModel, prepared: _Prepared, chosen: list[int]
    ) -> tuple[list[float], int]:
        flat = [(i, j) for i in chosen for j in range(len(prepared.requests[i]))]
        lengths = {key: sum(map(len, prepared.requests[key[0]][key[1]])) for key in flat}
        flat.sort(key=lambda key: -lengths[key])
        logprob: dict[tuple[int, int], float] = {}
        for start in range(0, len(flat), self.batch_size):
            keys = flat[start : start + self.batch_size]
            pairs = [prepared.requests[i][j] for i, j in keys]
            pixels = prepared.pixels([i for i, _ in keys])
            logprob.update(
                zip(keys, continuation_logprobs(model, pairs, pad_id=self._pad_id, pixel_values=pixels), strict=True)
            )
        task, scorer = prepared.task, prepared.task.scorer
        assert isinstance(scorer, LoglikScorer)
        rows = task.examples(self.split)
        values = []
        for i in chosen:
            requests = prepared.requests[i]
            if scorer.mode == "perplexity":
                values.append(logprob[(i, 0)] / len(requests[0][1]))
                continue
            choices = rows[i][scorer.choices_field or ""]
            totals = [logprob[(i, j)] for j in range(len(requests))]
            if scorer.length_normalize:
                totals = [t / max(len(str(c)), 1) for t, c in zip(totals, choices, strict=True)]
            best = max(range(len(totals)), key=totals.__getitem__)
            values.append(1.0 if best == choice_index(choices, rows[i][task.spec.answer_field]) else 0.0)
        return values, sum(lengths.values())


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Pads are masked out, so any id works when the tokenizer has none; EOS is the usual stand-in.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _model_eos_ids(model: PreTrainedModel) -> list[int]:
    # `generate` stops on the generation config's EOS ids (Llama 3 has several); so must we.
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


__all__ = ["EvalReport", "Evaluator", "TaskScore", "default_dtype", "mean_and_stderr"]
