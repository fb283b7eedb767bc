"""Estimated fitness: score a candidate on a few anchor examples and predict its full search-split fitness.

Everything the estimator learns from is read back from the run store — the baselines' and fully evaluated
trials' per-example search-split values — so a resumed run (or a worker) rebuilds the same anchors and
fit. Anchors are chosen once per run from the parents' and untuned merges' answers alone (seeded); the IRT
model is refitted whenever more fully evaluated models have arrived. See `config.Fitness`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate import Task, TaskScore
from evomerge.evaluate.scorers import GenerativeScorer
from evomerge.search.config import Fitness
from evomerge.search.irt import IrtFit, estimate_ability, fit_2pl, predicted_accuracy, select_anchors
from evomerge.search.objectives import Objectives
from evomerge.search.store import COMPLETE, ESTIMATED, RunStore, TrialRecord

#: Smallest prior standard deviation of a candidate's ability: a merge may lie well outside its parents.
MIN_PRIOR_SD = 1.0


@dataclass(frozen=True)
class Estimate:
    """A candidate's predicted full-split scores and fitness, and how many anchor examples they rest on."""

    fitness: float
    scores: dict[str, float]
    examples: int
    estimator: str
    answers: str  # how the anchors were answered: `generated`, `likelihood` or `margin`

    def to_dict(self) -> dict[str, Any]:
        return {"fitness": self.fitness, "scores": self.scores, "examples": self.examples,
                "estimator": self.estimator, "answers": self.answers}


def split_examples(total: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """`total` anchors shared among tasks in proportion to their search splits, at least one each."""
    whole = sum(sizes.values())
    return {task: max(1, min(size, round(total * size / whole))) for task, size in sizes.items()}


class FitnessEstimator:
    """Anchors, the IRT fit and the audit choice of one run (`fitness.estimator` subset or irt)."""

    def __init__(self, settings: Fitness, objectives: Objectives, sizes: Mapping[str, int], store: RunStore, seed: int):
        self.settings = settings
        self.objectives = objectives
        self.sizes = dict(sizes)
        self.store = store
        self.seed = seed
        self._anchors: dict[str, list[int]] | None = None
        self._fits: dict[str, tuple[int, IrtFit, float, float]] = {}  # task -> (rows fitted, fit, prior mean, prior sd)
        if self.graded:
            for task in objectives.tasks:
                if not (isinstance(task, Task) and isinstance(task.scorer, GenerativeScorer)):
                    raise ConfigError(
                        f"fitness.anchor_answers '{settings.anchor_answers}' needs generative task files, and "
                        f"objective '{task.name}' is not one; use 'generated'"
                    )

    @property
    def graded(self) -> bool:
        """Whether anchors are answered by one teacher-forced pass (`likelihood` or `margin`,
        `Session.answer_probabilities`) rather than by generation."""
        return self.settings.anchor_answers != "generated"

    @property
    def against_rival(self) -> bool:
        """Whether graded answers race each reference token against its strongest rival (`margin`)."""
        return self.settings.anchor_answers in ("margin", "margin_if_right")

    @property
    def zero_if_lost(self) -> bool:
        """Whether an anchor greedy decoding gets wrong counts 0 (`margin_if_right`): no partial credit."""
        return self.settings.anchor_answers == "margin_if_right"

    # --- what the fit learns from ---------------------------------------------------------------
    def _rows(self, *, baselines_only: bool = False) -> tuple[list[dict[str, list[float]]], int]:
        """Per-example search values of every fully evaluated model (parents first; `baselines_only`: the
        parents and untuned merges alone), and how many are parents."""
        baselines = self.store.baselines or {}
        parents = [b["search"] for b in baselines.values() if b.get("kind") == "parent"]
        others = [b["search"] for b in baselines.values() if b.get("kind") != "parent" and b.get("search")]
        trials = [] if baselines_only else [r.scores for r in self.store.fully_evaluated() if r.scores]
        rows = [{task: row[task]["values"] for task in self.sizes} for row in parents + others + trials
                if all("values" in row.get(task, {}) for task in self.sizes)]
        return rows, len(parents)

    @property
    def anchors(self) -> dict[str, list[int]]:
        """The anchor examples per task, chosen (seeded, once) from the parents' and baselines' answers
        alone, so that a resumed run or a worker chooses the same after audits have added full rows."""
        if self._anchors is None:
            rows, _ = self._rows(baselines_only=True)
            counts = split_examples(self.settings.examples, self.sizes)
            anchors = {}
            for task, k in counts.items():
                matrix = np.array([row[task] for row in rows], dtype=np.float64)
                if self.settings.estimator == "irt" and not np.isin(matrix, (0.0, 1.0)).all():
                    raise ConfigError(
                        f"fitness.estimator 'irt' needs tasks scored 0/1, and task '{task}' is not; use 'subset'"
                    )
                anchors[task] = select_anchors(matrix, k, seed=self.seed, method=self.settings.anchors).tolist()
            self._anchors = anchors
        return self._anchors

    @property
    def examples(self) -> int:
        """Anchor examples scored per estimated candidate."""
        return sum(len(indices) for indices in self.anchors.values())

    def wants_full(self) -> bool:
        """True while the first `warmup` candidates are still to be scored on the whole split."""
        return len(self.store.fully_evaluated()) < self.settings.warmup

    # --- estimating -----------------------------------------------------------------------------
    def _fit(self, task: str, rows: Sequence[dict[str, list[float]]], parents: int) -> tuple[IrtFit, float, float]:
        cached = self._fits.get(task)
        if cached is not None and cached[0] == len(rows):
            return cached[1:]
        fit = fit_2pl(np.array([row[task] for row in rows], dtype=np.float64))
        # MERGE³'s merged-performance prior: a merge's ability is centred on its parents' abilities.
        prior_mean = float(fit.theta[:parents].mean()) if parents else 0.0
        prior_sd = max(MIN_PRIOR_SD, float(fit.theta.std()))
        self._fits[task] = (len(rows), fit, prior_mean, prior_sd)
        return fit, prior_mean, prior_sd

    def estimate(self, scores: Mapping[str, TaskScore]) -> Estimate:
        """The predicted full-split fitness from the anchor answers among `scores` (a full score has them too;
        graded answers are the anchors' `answer_probabilities`)."""
        rows, parents = self._rows() if self.settings.estimator == "irt" else ([], 0)
        predicted: dict[str, float] = {}
        for task, anchor in self.anchors.items():
            by_index = dict(zip(scores[task].indices, scores[task].values, strict=True))
            answers = np.array([by_index[i] for i in anchor], dtype=np.float64)
            if self.settings.estimator == "subset":
                predicted[task] = float(answers.mean())
                continue
            fit, prior_mean, prior_sd = self._fit(task, rows, parents)
            items = np.array(anchor, dtype=int)
            theta = estimate_ability(fit, items, answers, prior_mean=prior_mean, prior_sd=prior_sd)
            # Probabilities are no 0/1 answers to keep as observed: the model's prediction everywhere.
            predicted[task] = (float(fit.probabilities(theta).mean()) if self.graded
                               else predicted_accuracy(fit, items, answers, theta))
        return Estimate(self.objectives.fitness(predicted), predicted, self.examples, self.settings.estimator,
                        self.settings.anchor_answers)

    # --- audits ---------------------------------------------------------------------------------
    def audit_due(self, counted: int) -> bool:
        """Whether the `counted`-th finished candidate ends an audit period."""
        every = self.settings.audit_every
        return every is not None and counted > 0 and counted % every == 0

    def to_audit(self) -> list[TrialRecord]:
        """The trials among the `audit_top_k` best estimates that are not yet scored on the whole split.

        Ranked by estimate over every candidate that has one (audited and warm-up ones included), so
        auditing again without new candidates audits nothing (a resumed, finished run stays as it was).
        """
        ranked = [r for r in self.store.trials() if r.estimate is not None and r.status in (ESTIMATED, COMPLETE)]
        ranked.sort(key=lambda r: (-r.estimate["fitness"], r.number))
        return [r for r in ranked[: self.settings.audit_top_k] if r.status == ESTIMATED]
