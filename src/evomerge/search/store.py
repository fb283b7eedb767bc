"""The run store: a run directory's layout and the one owner of what a run records on its Optuna study.

A run directory holds the frozen `config.yaml`, the study database (`study.db`, unless the config names
another URL), `parents.json` (resume integrity), `run.json` (the finished run's summary) and, for a
parameter-space run that a layer-path run builds on, its exported champion (`dfs_model_a`).

Every candidate's evidence lives in its trial's user attributes and the run's in the study's; this
module is the only code that reads or writes them (tests/test_architecture.py checks it). Readers —
the report, lineage, the search itself — see a trial as a typed `TrialRecord` and the run's attributes
through `RunStore`, never as bare strings.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe, parse_recipe
from evomerge.search.config import EvolveConfig

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
PARENTS_FILE = "parents.json"
#: Where a parameter-space run's champion is exported when a layer-path run (`dfs.ps_run`) starts from it.
PS_CHAMPION_DIR = "dfs_model_a"

# Trial statuses: only `complete` trials were scored on the whole search split; `estimated` ones were told
# an estimate from anchor examples (`fitness.estimator`) and read as `complete` once audited.
COMPLETE, RACED_OUT, DUPLICATE, FAILED, ESTIMATED = "complete", "raced_out", "duplicate", "failed", "estimated"
_AUDIT_PREFIX = "audit:"
#: Optuna states of a candidate that was dealt with: raced-out candidates are PRUNED (CMA-ES ignores
#: them; their partial scores are intermediate values), failed ones FAIL.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the run recorded it: Optuna's own fields (number, state, params, values, the retry
    history of a heartbeat-failed trial) and the trial's attributes (None when not recorded: a trial in
    flight, or one from an older run)."""

    number: int
    state: TrialState
    params: dict[str, float]
    values: list[float] | None
    status: str | None = None  # COMPLETE | RACED_OUT | DUPLICATE | FAILED
    generation: int | None = None
    genome_key: str | None = None
    recipe: str | None = None  # a parameter-space candidate: its recipe YAML
    path: str | None = None  # a layer-path candidate: `PathCandidate.to_json`
    scores: dict[str, dict[str, Any]] | None = None  # task -> {score, stderr, n, tokens}
    fitness: float | None = None  # full search-split fitness, or the estimate of a not yet audited trial
    estimate: dict[str, Any] | None = None  # {fitness, scores, examples, estimator}: the anchor-based estimate
    split: str | None = None
    examples: int | None = None
    examples_saved: int | None = None
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    tokens: int | None = None
    peak_memory_bytes: int | None = None
    device: str | None = None
    failure: str | None = None
    duplicate_of: int | None = None
    requeued_from: int | None = None
    # A reference trial (a parent or an untuned baseline, `RunStore.add_reference`), not a candidate:
    # its kind (`parent` | `untuned`) and its name in the run's baselines (`parent:math`, `ties_0.5`).
    kind: str | None = None
    name: str | None = None
    retry_history: tuple[int, ...] = ()

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        """The record of an Optuna trial."""
        attrs = {name: trial.user_attrs[name] for name in ATTRIBUTES if name in trial.user_attrs}
        return cls(
            number=trial.number, state=trial.state, params=dict(trial.params), values=trial.values,
            retry_history=tuple(trial.system_attrs.get("retry_history", ())), **attrs,
        )

    @property
    def fully_evaluated(self) -> bool:
        """Complete and scored on the whole search split (raced-out and duplicate ones are not)."""
        return self.state == TrialState.COMPLETE and self.status == COMPLETE

    def with_audit(self, audit: Mapping[str, Any]) -> TrialRecord:
        """An estimated trial once scored on the whole split: complete, with its full scores and fitness
        (the estimate stays in `estimate`, the value the optimizer was told in `values`)."""
        return replace(
            self, status=COMPLETE, scores=audit["scores"], fitness=audit["fitness"],
            examples=(self.examples or 0) + audit["examples"], eval_seconds=(self.eval_seconds or 0) + audit["seconds"],
        )

    def score(self, task: str) -> float:
        """The search-split score of one task."""
        assert self.scores is not None
        return self.scores[task]["score"]


# What a trial may carry as user attributes: every TrialRecord field Optuna does not hold itself.
_OPTUNA_FIELDS = ("number", "state", "params", "values", "retry_history")
ATTRIBUTES = tuple(f.name for f in fields(TrialRecord) if f.name not in _OPTUNA_FIELDS)


def write(trial: optuna.Trial, **attributes: Any) -> None:
    """Record attributes on a trial in flight (names are `TrialRecord` fields)."""
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"'{name}' is not a trial attribute of the run store")
        trial.set_user_attr(name, value)


def retried(records: Sequence[TrialRecord]) -> set[int]:
    """Trials whose candidate was re-queued (by a resume or a heartbeat retry): they do not count."""
    numbers = {r.requeued_from for r in records if r.requeued_from is not None}
    # Trials a worker's heartbeat declared dead were re-queued by Optuna's retry callback.
    numbers.update(n for r in records for n in r.retry_history)
    return numbers


def counted(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Finished trials that count against the budget: interrupted ones were re-queued and do not."""
    dead = retried(records)
    return [r for r in records if r.state in FINISHED and r.number not in dead]


def champion(records: Iterable[TrialRecord]) -> int | None:
    """The best fully evaluated trial by fitness (the lower number on a tie), None before there is one."""
    best = max((r for r in records if r.fully_evaluated), key=lambda r: (r.fitness, -r.number), default=None)
    return None if best is None else best.number


class RunStore:
    """A run's study, read and written through typed names."""

    def __init__(self, study: optuna.Study):
        self.study = study

    # --- trials ---------------------------------------------------------------------------------
    def trials(self, states: Sequence[TrialState] | None = None) -> list[TrialRecord]:
        """Every candidate's trial (or those in `states`), in number order; audited estimated trials read as
        complete; reference trials are not candidates (`references`)."""
        audits = self.audits
        records = (TrialRecord.of(t) for t in self.study.get_trials(deepcopy=False, states=states))
        return [r.with_audit(audits[r.number]) if r.number in audits else r for r in records if r.kind is None]

    def generation_of(self, number: int, population: int) -> int:
        """The generation of candidate trial `number`: the one the study's sampler put it in where it keeps
        one (Optuna's CMA-ES and NSGA-II record a `...:generation` system attribute when they sample a
        trial; CMA-ES samples its first candidate independently), else its place among the candidates (not
        the reference trials) in steps of `population`."""
        trial = next(t for t in reversed(self.study.get_trials(deepcopy=False)) if t.number == number)
        recorded = [int(v) for k, v in trial.system_attrs.items() if k.endswith(":generation")]
        if recorded:
            return recorded[0]
        return sum(r.number < number for r in self.trials()) // population

    def references(self) -> list[TrialRecord]:
        """The parents' and untuned baselines' fixed trials (`add_reference`), in number order."""
        records = (TrialRecord.of(t) for t in self.study.get_trials(deepcopy=False))
        return [r for r in records if r.kind is not None]

    def add_reference(self, name: str, kind: str, values: Sequence[float] | None, *, scores: Mapping[str, Any],
                      fitness: float | None, recipe: str | None = None, failure: str | None = None) -> None:
        """Record a parent or an untuned baseline as a fixed trial, so Optuna's plots and the dashboard show
        it beside the candidates: COMPLETE with its measured search-split values (FAIL when it could not be
        scored), no parameters, and `kind` set, which every reader here uses to tell it from a candidate.

        Samplers would learn from a COMPLETE trial, and one without parameters empties the search space
        they infer, so references are added only once the search has spent its budget (`search.baselines.
        record_reference_trials`).
        """
        attrs = {"kind": kind, "name": name, "scores": dict(scores), "fitness": fitness, "split": "search",
                 "recipe": recipe, "failure": failure}
        # Optuna holds only finite values: a parent that scored NaN (weights that overflow) is a failed reference.
        if values is not None and not all(math.isfinite(v) for v in values):
            values = None
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        self.study.add_trial(optuna.trial.create_trial(
            state=state, values=None if values is None else list(values), params={}, distributions={},
            user_attrs={key: value for key, value in attrs.items() if value is not None},
        ))

    def set_metric_names(self, names: Sequence[str]) -> None:
        """Name the study's objectives (the dashboard's axes), unless they are already named."""
        if self.study.metric_names is None:
            with warnings.catch_warnings():  # experimental in Optuna since 3.2 and stable in use since
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(list(names))

    def counted_trials(self) -> list[TrialRecord]:
        """Trials that count against the budget (see `counted`)."""
        return counted(self.trials())

    def fully_evaluated(self) -> list[TrialRecord]:
        """Trials scored on the whole search split."""
        return [r for r in self.trials((TrialState.COMPLETE,)) if r.fully_evaluated]

    def champion(self) -> int | None:
        """The selected champion once the run has finished, else the best fully evaluated trial so far."""
        selection = self.selection
        return selection["champion"] if selection is not None else champion(self.fully_evaluated())

    def requeue_interrupted(self) -> int:
        """Trials left RUNNING by a killed process: mark failed and queue their genomes again."""
        interrupted = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in interrupted:
            self.study.tell(trial.number, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        return len(interrupted)

    # --- the run's attributes -------------------------------------------------------------------
    def _get(self, name: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(name, default)

    @property
    def audits(self) -> dict[int, dict[str, Any]]:
        """Full search-split results of estimated trials, by trial number (`{scores, fitness, examples, seconds}`)."""
        attrs = self.study.user_attrs
        return {int(name[len(_AUDIT_PREFIX):]): value for name, value in attrs.items() if name.startswith(_AUDIT_PREFIX)}

    def set_audit(self, number: int, *, scores: Mapping[str, Any], fitness: float, examples: int, seconds: float) -> None:
        # A finished trial's attributes are read-only in Optuna, so the audit is a study attribute of its own
        # (one per trial: concurrent workers never overwrite each other's).
        audit = {"scores": dict(scores), "fitness": fitness, "examples": examples, "seconds": seconds}
        self.study.set_user_attr(f"{_AUDIT_PREFIX}{number}", audit)

    @property
    def baselines(self) -> dict[str, Any] | None:
        """Search-split records of the parents and untuned merges (None until evaluated)."""
        return self._get("baselines")

    def set_baselines(self, baselines: Mapping[str, Any]) -> None:
        self.study.set_user_attr("baselines", dict(baselines))

    @property
    def selection(self) -> dict[str, Any] | None:
        """`{champion, specialists, challengers}` once the run has finished, else None."""
        return self._get("selection")

    def set_selection(self, champion: int, specialists: Mapping[str, int], challengers: Sequence[int]) -> None:
        self.study.set_user_attr(
            "selection", {"champion": champion, "specialists": dict(specialists), "challengers": list(challengers)}
        )

    @property
    def test_results(self) -> dict[str, Any]:
        """Test-split scores by entry (`parent:…`, baseline names, `candidate:N`); {} before selection."""
        return self._get("test_results") or {}

    def set_test_results(self, results: Mapping[str, Any]) -> None:
        self.study.set_user_attr("test_results", dict(results))

    @property
    def evidence(self) -> dict[str, Any] | None:
        """What the run is made of (`search.evidence`), or None for runs recorded before evidence existed."""
        return self._get("evidence")

    def set_evidence(self, evidence: Mapping[str, Any]) -> None:
        self.study.set_user_attr("evidence", dict(evidence))

    @property
    def genes(self) -> list[dict[str, Any]]:
        """The genome's genes (name, bounds, ...) as recorded when the search started."""
        return self._get("genes", [])

    def set_search_space(self, genes: Sequence[dict[str, Any]], population: int) -> None:
        self.study.set_user_attr("genes", list(genes))
        self.study.set_user_attr("population", population)

    @property
    def population(self) -> int | None:
        """Candidates per generation, as recorded when the search started (None before)."""
        return self._get("population")

    @property
    def x0(self) -> dict[str, float] | None:
        """The coordinator's warm start for workers' samplers."""
        return self._get("x0")

    def set_x0(self, x0: Mapping[str, float] | None) -> None:
        self.study.set_user_attr("x0", None if x0 is None else dict(x0))

    def publish_config(self, config: EvolveConfig, root: Path) -> None:
        """Store the config in the study so a worker given only the database URL can start."""
        self.study.set_user_attr("config", config.model_dump(mode="json"))
        self.study.set_user_attr("root", str(root))

    @property
    def published(self) -> tuple[dict[str, Any] | None, str | None]:
        """(config, root) as `publish_config` stored them, or Nones."""
        return self._get("config"), self._get("root")


# --- the run directory ----------------------------------------------------------------------------
STUDY_FILE = "study.db"


def storage_url(config: EvolveConfig, run_dir: Path) -> str:
    """The study's database: the configured URL, else SQLite inside the run directory."""
    return config.storage or f"sqlite:///{(run_dir / STUDY_FILE).resolve()}"


def prepare_run_dir(config: EvolveConfig, run_dir: Path) -> None:
    """Create the run directory with a frozen copy of its config; refuse to resume a different config, or a
    run whose history (its SQLite study) has gone missing beside its config."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir} is a file; give a directory for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run_dir / CONFIG_FILE
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if frozen.exists():
        if _with_defaults(_read_yaml(frozen)) != yaml.safe_load(text):
            raise ConfigError(
                f"run directory {run_dir} holds a different config; resume with the same config or pick a new --run"
            )
        _require_study_file(config, run_dir)
        return
    frozen.write_text(text)


def _with_defaults(data: Any) -> Any:
    # A run frozen before a config field existed has no entry for it; its default is what the run used.
    try:
        return EvolveConfig.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data


def _require_study_file(config: EvolveConfig, run_dir: Path) -> None:
    # Without this check SQLite would quietly create an empty study beside the old config: the finished
    # candidates would be gone without a word.
    if config.storage is None and not (run_dir / STUDY_FILE).is_file():
        raise ConfigError(
            f"run directory {run_dir} has {CONFIG_FILE} but no {STUDY_FILE}, so its history is lost; "
            "pick a new --run, or delete the directory to start over"
        )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{path} cannot be read as YAML; the run directory is damaged") from None


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def frozen_config(run_dir: Path) -> EvolveConfig:
    """The config a run directory was started with."""
    frozen = run_dir / CONFIG_FILE
    if not frozen.is_file():
        raise ConfigError(f"{run_dir} is not an evomerge run directory (no {CONFIG_FILE})")
    try:
        return EvolveConfig.model_validate(_read_yaml(frozen))
    except ValidationError:
        raise ConfigError(f"{frozen} is not a valid evolve config; the run directory is damaged") from None


def open_store(url: str, study_name: str) -> RunStore:
    """The store of a study in any database; a missing study or an unreadable database is a `ConfigError`.

    Only opens: an SQLite file that does not exist is refused rather than created empty.
    """
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no study database at {url} (the file does not exist)")
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
        _ = study.get_trials(deepcopy=False), study.user_attrs  # a damaged database is refused now, not later
        return RunStore(study)
    except KeyError:
        raise ConfigError(f"no study named '{study_name}' at {url}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ValueError) as error:
        raise ConfigError(f"cannot open the study database {url}: {type(error).__name__}") from None


def load_run(run_dir: str | Path) -> tuple[EvolveConfig, RunStore]:
    """The frozen config and the store of an existing run directory."""
    run_dir = Path(run_dir)
    config = frozen_config(run_dir)
    # Reading a run never creates one: SQLite would make an empty database where none was.
    _require_study_file(config, run_dir)
    try:
        return config, open_store(storage_url(config, run_dir), config.name)
    except ConfigError:
        raise ConfigError(
            f"run directory {run_dir}: its study '{config.name}' cannot be opened (missing or damaged database)"
        ) from None


def find_trial(store: RunStore, candidate: str) -> TrialRecord:
    """A trial by number, or the run's selected champion (`champion`)."""
    trials = {r.number: r for r in store.trials()}
    if candidate == "champion":
        selection = store.selection
        if selection is None:
            raise ConfigError("the run has no champion yet; let the evolve finish or name a candidate number")
        return trials[selection["champion"]]
    if not candidate.isdigit() or int(candidate) not in trials:
        raise ConfigError(f"candidate '{candidate}' is not a trial number of this run (0..{len(trials) - 1})")
    record = trials[int(candidate)]
    if record.recipe is None and record.path is None:
        raise ConfigError(f"candidate {candidate} has no recipe recorded")
    return record


def recipe_of(record: TrialRecord) -> Recipe:
    """The decoded recipe a parameter-space trial stored."""
    assert record.recipe is not None
    return parse_recipe(yaml.safe_load(record.recipe), source=f"trial {record.number}")


def write_run_file(run_dir: Path, data: Mapping[str, Any]) -> None:
    """Atomically replace the run's JSON summary."""
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(run_dir / RUN_FILE)
