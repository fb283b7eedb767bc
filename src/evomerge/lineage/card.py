"""Hugging Face model cards for merged models: metadata front matter plus a plain-language summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TAGS = ("merge", "evomerge")


@dataclass(frozen=True)
class CardScore:
    """One evaluation result shown in the card's `model-index`."""

    task: str
    metric: str
    value: float
    split: str = "test"


@dataclass(frozen=True)
class CardInfo:
    """Everything a model card says about how a merged model was made and what it is for."""

    name: str
    method: str
    parents: Sequence[str]
    recipe_yaml: str
    base_model: str | None = None
    summary: str = ""
    intended_use: str = ""
    scores: Sequence[CardScore] = field(default_factory=tuple)
    extra_sections: Mapping[str, str] = field(default_factory=dict)


def render_model_card(info: CardInfo) -> str:
    """The `README.md` text: YAML front matter (`base_model`, `tags`, `model-index`) and Markdown body."""
    base_models = [info.base_model] if info.base_model else []
    base_models += [parent for parent in info.parents if parent not in base_models]
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=score.task,
            dataset_name=score.task,
            dataset_split=score.split,
            metric_type=score.metric,
            metric_value=score.value,
        )
        for score in info.scores
    ]
    data = ModelCardData(
        base_model=base_models,
        library_name="transformers",
        tags=[*TAGS, info.method],
        model_name=info.name,
        eval_results=eval_results or None,
    )
    parents = "\n".join(f"- `{parent}`" for parent in base_models)
    summary = info.summary or (
        f"This model was made without training by merging the parameters of its parents with the "
        f"`{info.method}` method, using evomerge."
    )
    sections = [
        f"# {info.name}",
        summary,
        "## Parents\n\n" + parents,
    ]
    if info.intended_use:
        sections.append("## Intended use\n\n" + info.intended_use)
    if info.scores:
        rows = "\n".join(f"| {s.task} | {s.split} | {s.metric} | {s.value:.4f} |" for s in info.scores)
        sections.append("## Evaluation\n\n| task | split | metric | value |\n|---|---|---|---|\n" + rows)
    sections += [f"## {title}\n\n{body}" for title, body in info.extra_sections.items()]
    sections.append("## Recipe\n\n```yaml\n" + info.recipe_yaml.rstrip() + "\n```")
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n\n".join(sections) + "\n")
    return str(card)
