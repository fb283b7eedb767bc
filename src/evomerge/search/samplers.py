"""Optuna samplers for the search, with the paper's CMA-ES defaults."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import optuna

from evomerge.search.config import EvolveConfig


def cmaes_population(num_genes: int) -> int:
    """CMA-ES's default population, 4 + floor(3 ln n) (Hansen), as the paper used."""
    return 4 + math.floor(3 * math.log(max(num_genes, 1)))


def population_size(config: EvolveConfig, num_genes: int) -> int:
    """The configured population, else the optimizer's default."""
    if config.budget.population is not None:
        return config.budget.population
    if config.resolved_optimizer == "nsga2":
        return max(8, 2 * cmaes_population(num_genes))
    return cmaes_population(num_genes)


def make_sampler(
    config: EvolveConfig,
    *,
    num_genes: int,
    x0: Mapping[str, float] | None,
) -> optuna.samplers.BaseSampler:
    """The optimizer named in the config, seeded; CMA-ES starts at `x0` with step size `sigma0`.

    Optuna's CMA-ES works on genes rescaled to [0, 1], so `sigma0` is a fraction of each gene's range
    (the paper's 1/6).
    """
    optimizer = config.resolved_optimizer
    popsize = population_size(config, num_genes)
    if optimizer == "cmaes":
        with warnings.catch_warnings():
            # x0/sigma0 are deprecated in favour of warm starts from source trials, which need many
            # evaluated solutions; a single best-known recipe is what we have, so keep the plain form.
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(
                x0=dict(x0) if x0 else None,
                sigma0=config.sigma0,
                popsize=popsize,
                seed=config.seed,
                warn_independent_sampling=False,
            )
    if optimizer == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=popsize, seed=config.seed)
    if optimizer == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=min(10, popsize))
    if optimizer == "gp":
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=min(10, popsize))
    return optuna.samplers.RandomSampler(seed=config.seed)
