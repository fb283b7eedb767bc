"""Hugging Face model cards for merged models: Hub-valid front matter plus a plain-language summary.

Lives beside the streaming merge because `run_merge` writes a card for every merge (the CLI and Python
write the same one); release packets (`lineage.packet`) add their evaluation on top.

Hub rules the card keeps: `base_model` lists Hub repository ids only (a local parent would leak a path of
this machine and fail `huggingface_hub.utils.validate_repo_id`), so local parents are named by their
directory name in the text and the recipe; `license` comes from the merge itself or from the parents'
own cards (`README.md` front matter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

from evomerge.errors import ConfigError, ModelError

TAGS = ("merge", "evomerge")
MERGEKIT_CONFIG = "mergekit_config.yml"
# The Hub's cache lays a snapshot out as .../models--<org>--<name>/snapshots/<revision>.
HUB_CACHE_PREFIX = "models--"


@dataclass(frozen=True)
class CardScore:
    """One evaluation result shown in the card's `model-index`."""

    task: str
    metric: str
    value: float
    split: str = "test"


@dataclass(frozen=True)
class CardLicense:
    """A license as the Hub writes it: an id (`apache-2.0`), or `other` with a name and a link."""

    license: str
    name: str | None = None
    link: str | None = None

    def describe(self) -> str:
        return self.name or self.license


@dataclass(frozen=True)
class CardInfo:
    """Everything a model card says about how a merged model was made and what it is for.

    `parents` are references as the recipe wrote them (hub ids or local paths); `recipe_yaml` may contain
    them and is shown with local paths replaced by the parents' directory names.
    """

    name: str
    method: str
    parents: Sequence[str]
    recipe_yaml: str
    base_model: str | None = None
    license: CardLicense | None = None
    mergekit_config: bool = False
    summary: str = ""
    intended_use: str = ""
    scores: Sequence[CardScore] = field(default_factory=tuple)
    extra_sections: Mapping[str, str] = field(default_factory=dict)


def hub_model_id(ref: str) -> str | None:
    """The Hub repository id of a parent reference, or None for a model that exists only on this machine.

    A path inside the Hugging Face cache (`models--org--name/snapshots/rev`) is that repository; an
    existing local directory is local; anything else that is a valid repository id is one.
    """
    path = Path(ref)
    if path.exists():
        for part in path.resolve().parts:
            if part.startswith(HUB_CACHE_PREFIX):
                return part.removeprefix(HUB_CACHE_PREFIX).replace("--", "/")
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def parent_label(ref: str) -> str:
    """How the card names a parent: its Hub id, else its directory name (never a path of this machine)."""
    return hub_model_id(ref) or Path(ref).resolve().name


def read_card_license(model_dir: str | Path) -> CardLicense | None:
    """The license a model's own card (`README.md` front matter) declares, or None if it declares none."""
    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return None
    try:
        metadata = metadata_load(readme) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise ModelError(f"model card {readme} cannot be read: {error}") from None
    value = metadata.get("license")
    if not isinstance(value, str) or not value.strip():
        return None
    name, link = metadata.get("license_name"), metadata.get("license_link")
    return CardLicense(value.strip(), str(name) if name else None, str(link) if link else None)


def resolve_license(
    parents: Mapping[str, Path], explicit: str | None, *, required: bool, field_name: str
) -> CardLicense | None:
    """The merged model's license: `explicit` if given, else the one license every parent's card declares.

    `parents` maps each reference (as the recipe wrote it) to its model directory. Parents declaring
    different licenses are refused (a merge of them has no license the parents agree on); parents that
    declare none are refused only when `required` (a release packet), else the card has no license.
    `field_name` names where the user sets the license in the error message.
    """
    if explicit:
        return CardLicense(explicit)
    found = {ref: read_card_license(directory) for ref, directory in parents.items()}
    known = {ref: lic for ref, lic in found.items() if lic is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{parent_label(ref)} ({lic.describe()})" for ref, lic in known.items())
        raise ConfigError(f"the parents' licenses conflict: {listed}; set {field_name} to the merged model's license")
    unknown = [parent_label(ref) for ref, lic in found.items() if lic is None]
    if unknown:
        if required:
            raise ConfigError(
                f"the license of {', '.join(unknown)} is unknown (no `license` in its README.md card); "
                f"set {field_name} to the merged model's license"
            )
        return None
    return next(iter(known.values()), None)


def _local_paths_replaced(text: str, parents: Sequence[str]) -> str:
    """`text` with every local parent path (as written and resolved) replaced by the parent's label."""
    replacements: dict[str, str] = {}
    for ref in parents:
        if hub_model_id(ref) is None or Path(ref).exists():
            label = parent_label(ref)
            replacements[ref] = label
            replacements[str(Path(ref).resolve())] = label
    for old in sorted(replacements, key=len, reverse=True):  # a longer path first: it may contain a shorter one
        if old != replacements[old]:
            text = text.replace(old, replacements[old])
    return text


def render_model_card(info: CardInfo) -> str:
    """The `README.md` text: YAML front matter (`base_model`, `license`, `tags`, `model-index`) and body."""
    refs = ([info.base_model] if info.base_model else []) + [p for p in info.parents if p != info.base_model]
    hub_ids = [hub for hub in (hub_model_id(ref) for ref in refs) if hub is not None]
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
    lic = info.license
    data = ModelCardData(
        base_model=list(dict.fromkeys(hub_ids)) or None,
        library_name="transformers",
        license=lic.license if lic else None,
        license_name=lic.name if lic else None,
        license_link=lic.link if lic else None,
        tags=[*TAGS, *(["mergekit"] if info.mergekit_config else []), info.method],
        model_name=info.name,
        eval_results=eval_results or None,
    )

    def describe(ref: str) -> str:
        role = " (base)" if ref == info.base_model else ""
        hub = hub_model_id(ref)
        where = f"[`{hub}`](https://huggingface.co/{hub})" if hub else f"`{parent_label(ref)}`, a local model"
        return f"- {where}{role}"

    summary = info.summary or (
        f"This model was made without training by merging the parameters of its parents with the "
        f"`{info.method}` method, using evomerge."
    )
    sections = [f"# {info.name}", summary, "## Parents\n\n" + "\n".join(describe(ref) for ref in refs)]
    if any(hub_model_id(ref) is None for ref in refs):
        sections[-1] += (
            "\n\nLocal parents are named by their directory name; `lineage.json` identifies each by the "
            "hash of its weights."
        )
    sections.append(
        "## License\n\n"
        + (f"`{lic.describe()}`." if lic else "Not stated: the parents' cards declare no license and none was given.")
    )
    if info.intended_use:
        sections.append("## Intended use\n\n" + info.intended_use)
    if info.scores:
        rows = "\n".join(f"| {s.task} | {s.split} | {s.metric} | {s.value:.4f} |" for s in info.scores)
        sections.append("## Evaluation\n\n| task | split | metric | value |\n|---|---|---|---|\n" + rows)
    sections += [f"## {title}\n\n{body}" for title, body in info.extra_sections.items()]
    recipe = "## Recipe\n\n```yaml\n" + info.recipe_yaml.rstrip() + "\n```"
    if info.mergekit_config:
        recipe += (
            f"\n\nThe same merge as a mergekit configuration ships as `{MERGEKIT_CONFIG}` "
            f"(`mergekit-yaml {MERGEKIT_CONFIG} OUT` reproduces the weights)."
        )
    sections.append(recipe)
    body = _local_paths_replaced("\n\n".join(sections), refs)
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + body + "\n"))
