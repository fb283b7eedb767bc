"""Merge recipes: evomerge's YAML and mergekit's YAML, validated into one typed `Recipe`.

Our format deliberately mirrors mergekit's vocabulary (`models`, `base_model`, `parameters`, `slices`,
`tokenizer_source`, `dtype`) so a recipe reads the same in both tools and the same numbers come out;
it differs in the top-level `method` key (mergekit: `merge_method`), which is how the format is detected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.merge.chat_template import check_chat_template
from evomerge.merge.registry import OperatorSpec, get_operator
from evomerge.validation import validation_sentence

Number = StrictBool | float


class FilterRule(BaseModel):
    """`{filter, value}`: applies `value` to tensors whose name contains `filter` (no filter: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Number | list[float]


ParamValue = Number | list[float] | list[FilterRule]
Parameters = dict[str, ParamValue]
DType = Literal["float32", "float16", "bfloat16"]


class ModelEntry(BaseModel):
    """One parent model with its per-model parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(BaseModel):
    """A contiguous range of layers `[start, end)` taken from one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _range_is_ordered(self) -> SliceSource:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range [{start}, {end}] must satisfy 0 <= start < end")
        return self


class Slice(BaseModel):
    """One output slice: its sources' layer ranges (equal lengths) are merged layer by layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _equal_lengths(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"the sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class Submodule(BaseModel):
    """Merge only the tensors under `prefix` of the reference model; copy the rest from it.

    The reference is `copy_rest_from` when given, else the base, else the first model: the merged model
    has its tensor names, config and tokenizer/processor files. The other models (base included) carry
    the same tensors under `parent_prefix` — e.g. a vision-language model's `language_model.` against a
    plain LLM's `""`: with `copy_rest_from` naming the VLM, its language tower is merged with plain LLM
    parents over a plain LLM base, and its vision tower and projector are copied.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str
    parent_prefix: str = ""
    copy_rest_from: str | None = None


class Recipe(BaseModel):
    """A complete, validated merge recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    # Also donates config.json and generation_config.json, whose special-token ids must match its tokenizer
    # (mergekit takes the config from the base instead; the merged tensors are the same).
    tokenizer_source: str | None = None
    seed: int = 0
    submodule: Submodule | None = None
    allow_pickle: bool = False
    name: str | None = None
    # mergekit's key: a template name, `auto` (the parents' most common template), Jinja text, or (evomerge
    # only) a template file; written as `chat_template.jinja` (merge.chat_template).
    chat_template: str | None = None
    # The merged model's license for its card; without it the parents' cards decide (merge.card).
    license: str | None = None

    @model_validator(mode="after")
    def _has_sources(self) -> Recipe:
        if not self.models and not self.slices:
            raise ValueError("a recipe needs `models` or `slices`")
        if self.models and self.slices:
            raise ValueError("give either `models` or `slices`, not both")
        return self

    # --- derived views -------------------------------------------------------------------------
    @property
    def operator(self) -> OperatorSpec:
        return get_operator(self.method)

    def parent_refs(self) -> list[str]:
        """Every model the recipe reads, base first, in a deterministic order without repeats."""
        refs: list[str] = []
        candidates = [self.base_model] if self.base_model else []
        if self.slices:
            candidates += [src.model for sl in self.slices for src in sl.sources]
        else:
            candidates += [entry.model for entry in self.models]
        if self.submodule and self.submodule.copy_rest_from:
            candidates.append(self.submodule.copy_rest_from)
        for ref in candidates:
            if ref not in refs:
                refs.append(ref)
        return refs

    def donor_ref(self) -> str:
        """Where config and tokenizer files come from: explicit source, else the reference model."""
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):  # union extends the base's
            return self.tokenizer_source
        return self.reference_ref()

    def reference_ref(self) -> str:
        """The model whose tensor names the merge has: `submodule.copy_rest_from`, else base, else first."""
        if self.submodule and self.submodule.copy_rest_from:
            return self.submodule.copy_rest_from
        return self.base_model or self.parent_refs()[0]

    def to_yaml(self) -> str:
        """evomerge's YAML form (round-trips through `parse_recipe`)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"method": data.pop("method"), **data}
        return yaml.safe_dump(data, sort_keys=False)

    def to_mergekit_yaml(self) -> str | None:
        """mergekit's YAML for the same merge, or None where mergekit cannot express it."""
        if self.submodule is not None or self.method not in MERGEKIT_METHODS:
            return None
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"allow_pickle", "name", "seed", "license"})
        data.pop("method")
        data = {"merge_method": self.method, **data}
        return yaml.safe_dump(data, sort_keys=False)


# Methods whose parameters and numbers are the same in mergekit 0.1.5.
MERGEKIT_METHODS = frozenset(
    {
        "linear",
        "task_arithmetic",
        "slerp",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
    }
)
# mergekit keys with no effect on the numbers (memory or logging options), accepted and ignored.
MERGEKIT_IGNORED_KEYS = frozenset({"int8_mask"})


def _from_mergekit(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Translate mergekit's top-level keys into ours; the nested vocabulary is shared."""
    converted = {key: value for key, value in data.items() if key not in MERGEKIT_IGNORED_KEYS}
    converted["method"] = converted.pop("merge_method")
    parameters = converted.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"{source}: field 'parameters' must be a mapping of parameter names to values")
    parameters = dict(parameters)
    parameters.pop("int8_mask", None)
    if parameters or "parameters" in converted:
        converted["parameters"] = parameters
    tokenizer = converted.pop("tokenizer", None)
    if tokenizer is not None:
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"}:
            raise ConfigError(f"{source}: field 'tokenizer' supports only 'source' in evomerge")
        if tokenizer.get("tokens") or tokenizer.get("pad_to_multiple_of"):
            raise ConfigError(f"{source}: field 'tokenizer' with 'tokens' or padding is not supported by evomerge")
        converted["tokenizer_source"] = tokenizer.get("source")
    return converted


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (ours or mergekit's) and check it against its operator."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        data = _from_mergekit(data, source)
    elif "method" not in data:
        near = difflib.get_close_matches("method", [str(key) for key in data], n=1, cutoff=0.6)
        hint = f"; is '{near[0]}' a misspelling of it?" if near else ""
        raise ConfigError(f"{source}: missing field 'method' (or mergekit's 'merge_method'){hint}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(validation_sentence(error, source, Recipe)) from None
    check_against_operator(recipe, source)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (evomerge or mergekit YAML, auto-detected)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"recipe file {path} cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe file {path} is not valid YAML{where}") from None
    return parse_recipe(data, source=str(path))


# --- semantic checks against the operator ----------------------------------------------------------


def _param_values(value: ParamValue) -> list[float]:
    """Every number a parameter value can take (scalar, gradient points, filter rule values)."""
    if isinstance(value, list):
        numbers: list[float] = []
        for item in value:
            if isinstance(item, FilterRule):
                numbers += _param_values(item.value)
            else:
                numbers.append(float(item))
        return numbers
    return [float(value)]


def _check_parameters(spec: OperatorSpec, parameters: Parameters, where: str, *, per_model: bool) -> None:
    known_params = {param.name: param for param in spec.params}
    for name, value in parameters.items():
        param = known_params.get(name)
        if param is None:
            hint = difflib.get_close_matches(name, list(known_params), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            known = ", ".join(sorted(known_params)) or "none"
            raise ConfigError(
                f"{where}: unknown parameter '{name}' for method '{spec.name}'{suggestion} (its parameters: {known})"
            )
        if per_model and not param.per_model:
            raise ConfigError(
                f"{where}: parameter '{name}' of method '{spec.name}' is global; set it under the top-level `parameters`"
            )
        for number in _param_values(value):
            if not param.low <= number <= param.high:
                raise ConfigError(
                    f"{where}: parameter '{name}' = {_digits(number)} is out of range [{param.low:g}, {param.high:g}]"
                )


def _digits(number: float) -> str:
    """Short where that is exact, every digit otherwise: 1.0000001 must not read as the bound 1."""
    return f"{number:g}" if float(f"{number:g}") == number else repr(number)


def _check_single_input(spec: OperatorSpec, recipe: Recipe, source: str) -> None:
    """Methods that merge one model per tensor (SLERP, passthrough) fail here, naming the field."""
    if not spec.single_input:
        return
    drops_base = spec.needs_base or spec.space == "delta"  # the planner's rule: the base is not an input
    groups = [("models", [entry.model for entry in recipe.models])] if recipe.slices is None else [
        (f"slices[{index}].sources", [src.model for src in sl.sources]) for index, sl in enumerate(recipe.slices)
    ]
    into = " into the base model" if spec.needs_base else ""
    for field, refs in groups:
        count = sum(1 for ref in refs if not (drops_base and ref == recipe.base_model))
        if count != 1:
            raise ConfigError(f"{source}: field '{field}': method '{spec.name}' merges exactly one model{into}, got {count}")


def _check_required(spec: OperatorSpec, recipe: Recipe, source: str) -> None:
    """A required parameter given nowhere for a merged model fails here, naming the file and the entry.

    Filter rules that miss some tensors are only found per tensor, by the planner.
    """
    if recipe.slices is not None:
        return
    for param in spec.params:
        if not param.required or param.name in recipe.parameters:
            continue
        for index, entry in enumerate(recipe.models):
            merged = not (spec.space == "delta" and entry.model == recipe.base_model)
            if merged and param.name not in entry.parameters:
                raise ConfigError(
                    f"{source}: models[{index}].parameters: parameter '{param.name}' of method '{spec.name}' is "
                    "required; set it there or under the top-level `parameters`"
                )


def check_against_operator(recipe: Recipe, source: str = "recipe") -> None:
    """Method exists, parameters belong to it and lie in range, base model present when needed."""
    try:
        spec = recipe.operator
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    _check_parameters(spec, recipe.parameters, f"{source}: parameters", per_model=False)
    for index, entry in enumerate(recipe.models):
        _check_parameters(spec, entry.parameters, f"{source}: models[{index}].parameters", per_model=True)
    for s_index, sl in enumerate(recipe.slices or []):
        _check_parameters(spec, sl.parameters, f"{source}: slices[{s_index}].parameters", per_model=False)
        for index, src in enumerate(sl.sources):
            where = f"{source}: slices[{s_index}].sources[{index}].parameters"
            _check_parameters(spec, src.parameters, where, per_model=True)
    if spec.needs_base and not recipe.base_model:
        raise ConfigError(f"{source}: method '{spec.name}' needs a `base_model`")
    _check_required(spec, recipe, source)
    _check_single_input(spec, recipe, source)
    if recipe.chat_template is not None:
        check_chat_template(recipe.chat_template, source)
    if recipe.tokenizer_source not in (None, "base", "union") and recipe.tokenizer_source not in recipe.parent_refs():
        raise ConfigError(
            f"{source}: field 'tokenizer_source' names '{recipe.tokenizer_source}', which is not one of the models"
        )
