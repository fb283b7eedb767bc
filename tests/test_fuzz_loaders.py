"""Loaders take files from strangers: whatever nested YAML-like data arrives, only `EvomergeError` may escape."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import EvomergeError
from evomerge.evaluate import load_task
from evomerge.merge.recipe import parse_recipe
from evomerge.search.config import parse_evolve_config

# Keys the loaders know, mixed with arbitrary text, so the data reaches deep validation paths often.
KNOWN_KEYS = [
    "method", "merge_method", "models", "model", "parameters", "weight", "density", "base_model", "slices",
    "sources", "layer_range", "dtype", "seed", "name", "parents", "genome", "bounds", "granularity",
    "block_size", "objectives", "task", "budget", "candidates", "fixed", "dfs", "data", "search", "test",
    "prompt", "answer_field", "scorer", "scorer_args", "generation", "max_new_tokens", "fewshot", "path",
    "split_field", "filter", "value", "combine", "optimizer", "racing", "tokenizer", "source",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["linear", "ties", "dare_ties", "per_layer", "exact", "{question}="]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)
top_level = st.one_of(documents, st.dictionaries(st.sampled_from(KNOWN_KEYS), documents, min_size=1, max_size=8))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(top_level)
def test_parse_recipe_raises_only_evomerge_errors(data):
    try:
        parse_recipe(data, source="fuzz.yaml")
    except EvomergeError:
        pass


@FUZZ
@given(top_level)
def test_parse_evolve_config_raises_only_evomerge_errors(data):
    try:
        parse_evolve_config(data, source="fuzz.yaml", root=Path("/nonexistent-root"))
    except EvomergeError:
        pass


@FUZZ
@given(top_level)
def test_load_task_raises_only_evomerge_errors(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("task")
    (directory / "rows.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    path = directory / "task.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_task(path)
    except EvomergeError:
        pass
