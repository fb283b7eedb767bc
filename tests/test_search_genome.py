"""Genome codec: granularities, decoding into ordinary recipes, and the parameters the merge sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.plan import job_parameters, plan_jobs
from evomerge.merge.stream import open_parents
from evomerge.models import Checkpoint
from evomerge.search.config import parse_evolve_config
from evomerge.search.genome import ParameterGenome, genome_key


@pytest.fixture(scope="module")
def parents(tiny_llama) -> tuple[Path, Path, Path]:
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)


def make_genome(parents, tmp_path: Path, genome: dict, method: str = "dare_ties", fixed: dict | None = None) -> ParameterGenome:
    task = tmp_path / "t.yaml"
    task.write_text("placeholder")
    config, _ = parse_evolve_config(
        {
            "base_model": str(parents[0]),
            "parents": [str(parents[1]), str(parents[2])],
            "method": method,
            "genome": genome,
            "fixed": fixed or {},
            "objectives": [{"task": str(task)}],
        },
        source="test",
        root=tmp_path,
    )
    donor = Checkpoint.open(parents[0])
    from evomerge.merge.registry import get_operator

    return ParameterGenome(
        config, get_operator(method), [str(parents[1]), str(parents[2])], donor.tensor_names(),
        donor.model_type, donor.num_layers,
    )


def resolved(recipe, parents) -> dict[str, dict]:
    """The kernel parameters each tensor gets when the decoded recipe is merged."""
    checkpoints = open_parents(recipe)
    return {job.out_name: job_parameters(recipe.operator, job) for job in plan_jobs(recipe, recipe.operator, checkpoints)}


def test_per_layer_weights_reach_exactly_their_layer(parents, tmp_path):
    genome = make_genome(parents, tmp_path, {"weight": {"bounds": [0, 2], "granularity": "per_layer"}})
    # 4 layers + the tensors outside them, for each of the two merged models.
    assert len(genome) == 2 * 5
    values = {gene.name: index / 10 for index, gene in enumerate(genome.genes)}
    recipe = genome.decode(values, seed=3)
    params = resolved(recipe, parents)
    for gene in genome.genes:
        model_index = genome.merged_models.index(gene.model)
        # Genes carry the parent's directory name, not its index: `weight.llama_s10.layer0`.
        assert gene.name == f"weight.{Path(gene.model).name}.{gene.group}"
        for name, kernel_params in params.items():
            in_group = (f"layers.{gene.group[5:]}." in name) if gene.group.startswith("layer") else ("layers." not in name)
            if in_group:
                assert kernel_params["weight"][model_index] == pytest.approx(values[gene.name])
    assert recipe.seed == 3


def test_per_kind_genes_separate_attention_mlp_and_norms(parents, tmp_path):
    genome = make_genome(
        parents, tmp_path, {"density": {"bounds": [0.1, 1], "granularity": "per_kind", "per_model": False}},
        fixed={"weight": 0.5},
    )
    labels = {gene.group for gene in genome.genes}
    assert labels == {"embedding", "attention", "mlp", "norm", "head"}
    values = {gene.name: 0.1 + 0.1 * i for i, gene in enumerate(genome.genes)}
    params = resolved(genome.decode(values, seed=0), parents)
    by_label = {gene.group: values[gene.name] for gene in genome.genes}
    assert params["model.layers.2.self_attn.q_proj.weight"]["density"] == [pytest.approx(by_label["attention"])] * 2
    assert params["model.layers.0.mlp.down_proj.weight"]["density"] == [pytest.approx(by_label["mlp"])] * 2
    assert params["model.norm.weight"]["density"] == [pytest.approx(by_label["norm"])] * 2
    assert params["lm_head.weight"]["density"] == [pytest.approx(by_label["head"])] * 2


def test_block_size_must_divide_the_depth(parents, tmp_path):
    with pytest.raises(ConfigError, match="block_size 3 does not divide the model's 4 layers"):
        make_genome(parents, tmp_path, {"weight": {"bounds": [0, 1], "granularity": "per_block", "block_size": 3}})
    genome = make_genome(parents, tmp_path, {"weight": {"bounds": [0, 1], "granularity": "per_block", "block_size": 2}})
    assert sorted({g.group for g in genome.genes}) == ["block0", "block1", "outside"]


def test_decoded_recipe_round_trips_through_yaml(parents, tmp_path):
    import yaml

    from evomerge.merge.recipe import parse_recipe

    genome = make_genome(parents, tmp_path, {"weight": {"bounds": [0, 2], "granularity": "per_layer"}})
    recipe = genome.decode([0.3] * len(genome), seed=1)
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert recipe.to_mergekit_yaml() is not None


def test_genome_key_ignores_float_noise_but_not_real_changes():
    a = {"x": 0.5, "y": 1 / 3}
    assert genome_key(a) == genome_key({"x": 0.5 + 1e-12, "y": 1 / 3})
    assert genome_key(a) != genome_key({"x": 0.51, "y": 1 / 3})


def test_required_operator_parameter_must_be_searched_or_fixed(parents, tmp_path):
    with pytest.raises(ConfigError, match="parameter 'weight' of method 'dare_ties' is required"):
        make_genome(parents, tmp_path, {"density": {"bounds": [0.1, 1]}})


def test_parent_labels_are_readable_unique_and_safe_in_gene_names():
    from evomerge.search.genome import model_labels

    models = ["/zoo/models/math", "/zoo/models/language", "other/math", "hub-org/name.v2 final", "x/math_2", "/"]
    labels = model_labels(models)
    assert labels == {"/zoo/models/math": "math", "/zoo/models/language": "language", "other/math": "math_2",
                      "hub-org/name.v2 final": "name_v2_final", "x/math_2": "math_2_2", "/": "m5"}
    assert len(set(labels.values())) == len(models)
    assert all("." not in label for label in labels.values())  # a dot would split `weight.LABEL.group`


def test_a_study_recorded_under_index_names_keeps_them(parents, tmp_path):
    from dataclasses import asdict

    from evomerge.search.genome import adopt_recorded_names

    genome = make_genome(parents, tmp_path, {"weight": {"bounds": [0, 2], "granularity": "per_layer"}})
    # What a run started before parent-named genes recorded: `weight.m0.layer0`, ...
    old = [{**asdict(gene), "name": f"weight.m{genome.merged_models.index(gene.model)}.{gene.group}"}
           for gene in genome.genes]
    adopted = adopt_recorded_names(genome.genes, old)
    assert [gene.name for gene in adopted] == [record["name"] for record in old]
    assert [(g.param, g.model, g.group, g.low, g.high) for g in adopted] == [
        (g.param, g.model, g.group, g.low, g.high) for g in genome.genes]
    # Another genome's record (a different granularity) renames nothing.
    other = [{**record, "group": "all"} for record in old]
    assert adopt_recorded_names(genome.genes, other) == genome.genes
