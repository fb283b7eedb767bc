"""The `evomerge` command line: typer commands that parse, call the library and print.

Every user-caused error (an `EvomergeError`) becomes one sentence on stderr and exit code 2;
no traceback is shown for those. The same names mean the same thing in every command: `--out` is
where an output is written, `--json` prints the machine-readable result on stdout instead of tables,
`--candidate` is a trial of a run (a number or `champion`), `--device` and `--allow-pickle` are those
of model loading. Choices are enums, so `--help` lists them. Nothing heavy (torch, transformers,
optuna) is imported before the arguments and config files are checked.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.exceptions import TyperException

from evomerge import __version__
from evomerge.display import Progress, SearchProgress, interruptible, results_table
from evomerge.errors import ConfigError, EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging: merge, evaluate, evolve, export and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
TRANSPARENT_HUGEPAGE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _choices(name: str, *values: str) -> type[Enum]:
    """A str enum of an option's choices: typer checks them and `--help` lists them."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


LineageFormat = _choices("LineageFormat", "text", "json", "dot")
ZooSize = _choices("ZooSize", "tiny", "small", "medium")
Split = _choices("Split", "search", "test")
Dtype = _choices("Dtype", "float32", "float16", "bfloat16")
Start = _choices("Start", "init", "best_baseline")
Family = _choices("Family", "text", "vlm")

# Shared option declarations: one wording per meaning.
JSON_HELP = "Print the result as JSON on stdout (instead of tables)."
DEVICE_HELP = "Device: cpu, cuda, cuda:N."
PICKLE_HELP = "Allow pickled (.bin/.pt) weights; they can run code when loaded."


def report_error(error: EvomergeError) -> int:
    """Print a user error as one sentence on stderr; return its exit code (2)."""
    message = " ".join(str(error).split())
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return error.exit_code


def option_sentence(error: typer.BadParameter) -> str:
    """A wrong or missing option value as one sentence naming the option (a choice's error lists the choices)."""
    if error.param is None or not error.message:  # e.g. a missing argument: typer's own sentence
        return error.format_message()
    return f"option {'/'.join(error.param.opts)}: {error.message.removeprefix('Value error, ')}"


def report_internal_error(error: Exception) -> int:
    """A bug, not a user error: one line naming it and a saved traceback to attach to a report; exit 1."""
    import tempfile
    import time
    import traceback

    report = Path(tempfile.gettempdir()) / f"evomerge-internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        report.write_text(f"evomerge {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        where = f"; the traceback is saved in {report}"
    except OSError:
        where = ""
    summary = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    err_console.print(
        f"[bold red]internal error:[/] {summary}. This is a bug in evomerge; please report it{where}.",
        highlight=False, soft_wrap=True,
    )
    return 1


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        console.print(f"evomerge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Evolutionary model merging: merge, evaluate, evolve, export and report."""


# --- commands ---------------------------------------------------------------------------------
# One block per command; keep them thin (parse, call the library, print).


@app.command("lineage")
def lineage_command(
    target: Path = typer.Argument(..., help="An exported model (directory with lineage.json) or a run directory."),
    format: LineageFormat = typer.Option(LineageFormat.text, "--format", help="text (a tree), json or dot (Graphviz)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
) -> None:
    """Show a model's ancestry across runs, back to the original checkpoints, with all its evidence."""
    from evomerge.lineage.dag import lineage, render_tree, to_dot

    graph = lineage(target)
    if as_json or format == LineageFormat.json:
        print_json(graph.to_dict())
    elif format == LineageFormat.dot:
        sys.stdout.write(to_dot(graph))
    else:
        console.print(render_tree(graph))


@app.command("report")
@interruptible(err_console, resumable=False)
def report_command(
    run: Path = typer.Argument(..., help="Run directory of an evolve (finished or still running)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write; default RUN/report.html."),
    png_dir: Path | None = typer.Option(None, "--png-dir", help="Also write PNGs of the figures here (needs Chromium)."),
    watch: float | None = typer.Option(None, "--watch", min=1, help="Rewrite every SECONDS until Ctrl-C; the page reloads."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write the evolution report: one self-contained HTML file that opens without a network."""
    from evomerge.report.html import watch as watch_report
    from evomerge.report.html import write_report

    if watch is not None:
        watch_report(run, out, watch, lambda result: err_console.print(f"report written to {result.path}"))
        return
    with Progress(err_console, f"writing the report of {run}"):
        result = write_report(run, out, png_dir=png_dir)
    if as_json:
        print_json({"path": result.path, "sections": list(result.sections), "pngs": list(result.pngs)})
        return
    console.print(f"report written to {result.path} ({len(result.sections)} sections)")
    for png in result.pngs:
        console.print(f"  {png}")


@app.command()
@interruptible(err_console, resumable=True)
def worker(
    target: str = typer.Argument(..., help="Run directory, or the study's database URL (postgresql://...)."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: the run's config name)."),
    device: str | None = typer.Option(None, "--device", help=f"{DEVICE_HELP} Default: the config's device."),
    max_candidates: int | None = typer.Option(None, "--max-candidates", min=1, help="Stop after N candidates here."),
    index: int = typer.Option(0, "--index", min=0, help="Worker number (seeds this worker's sampler)."),
    heartbeat: int = typer.Option(5, "--heartbeat", min=1, help="Seconds between this worker's heartbeats."),
    grace: int = typer.Option(60, "--grace", min=1, help="Seconds without a heartbeat before a trial is re-queued."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Join a search: hold the parents on one device and evaluate candidates until the budget is spent."""
    from evomerge.search.worker import run_worker

    done = run_worker(target, study=study, device=device, index=index, max_candidates=max_candidates,
                      heartbeat_seconds=heartbeat, grace_seconds=grace)
    if as_json:
        print_json({"worker": index, "evaluated": done})
    else:
        console.print(f"worker {index} evaluated {done} candidates")


@app.command()
@interruptible(err_console, resumable=False)
def zoo(
    out: Path | None = typer.Option(None, "--out", "-o", help="Directory of the zoo; an identical existing build is reused."),
    legacy_out: Path | None = typer.Argument(None, hidden=True, show_default=False, metavar="OUT"),
    size: ZooSize = typer.Option(ZooSize.tiny, "--size", help="tiny (CPU, minutes), small or medium (GPU)."),
    seed: int = typer.Option(0, help="Seed of data, initialisation and training."),
    force: bool = typer.Option(False, help="Rebuild even if an identical zoo exists."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    family: Family = typer.Option(Family.text, "--family", help="text, or vlm: a tiny Llava grown from the text zoo's base."),
) -> None:
    """Build the tiny model family (base, specialists, task files) deterministically."""
    from evomerge.zoo.builder import PRESETS, build_zoo

    if legacy_out is not None:  # `zoo OUT` was the old form; every other command takes --out
        if out is not None:
            raise ConfigError("give the zoo directory once, with --out")
        err_console.print("note: `evomerge zoo OUT` is deprecated; use `evomerge zoo --out OUT`", highlight=False)
        out = legacy_out
    if out is None:
        raise ConfigError("option --out is required: the directory of the zoo")
    if family is Family.vlm:
        if size is not ZooSize.tiny:
            raise ConfigError(f"--family vlm grows from the tiny text zoo only; drop --size {size.value}")
        _build_vlm_zoo(out, seed=seed, force=force, as_json=as_json)
        return
    preset = PRESETS[size.value]
    total = preset.base.steps + sum(config.steps for _, _, config in preset.specialists)
    finished: dict[str, int] = {}
    with Progress(err_console, "training", total=total) as progress:

        def advance(model: str, done: int, steps: int) -> None:
            finished[model] = done
            progress.update(description=f"training {model}", completed=sum(finished.values()))

        built = build_zoo(out, size=size.value, seed=seed, force=force, on_progress=advance)
    if as_json:
        print_json({"root": built.root, "base": built.base, "specialists": built.specialists,
                    "skills": built.skills, "tasks": built.tasks, "target_task": built.target_task})
        return
    console.print(f"zoo ({size.value}, seed {seed}) at {built.root}: base {built.base}")
    for name, path in built.specialists.items():
        console.print(f"  specialist {name} ({built.skills[name]}): {path}")
    console.print(f"  tasks: {', '.join(built.tasks)}; target: {built.target_task}")


def _build_vlm_zoo(out: Path, *, seed: int, force: bool, as_json: bool) -> None:
    from evomerge.zoo.vlm import build_vlm_zoo

    # The same progress as the text zoo's (a bar on a terminal, dated lines in a log), one model at a time.
    with Progress(err_console, "building the VLM zoo (and the tiny text zoo it grows from)") as progress:
        built = build_vlm_zoo(
            out, seed=seed, force=force,
            on_progress=lambda model, done, steps: progress.update(description=f"training {model}", completed=done, total=steps),
        )
    if as_json:
        print_json({"root": built.root, "vlm": built.vlm, "language": built.language, "tasks": built.tasks,
                    "target_task": built.target_task})
        return
    console.print(f"VLM zoo (seed {seed}) at {built.root}: vlm {built.vlm}, language parent {built.language}")
    console.print(f"  tasks: {', '.join(built.tasks)}; target: {built.target_task}")


@app.command()
@interruptible(err_console, resumable=True)
def evolve(
    config: Path = typer.Argument(..., help="Evolve config YAML."),
    run: Path = typer.Option(..., "--out", "--run", "-o", help="Run directory; an existing one is resumed."),
    workers: int = typer.Option(1, "--workers", min=1, help="Evaluate candidates in N worker processes."),
    accept_changed_parents: bool = typer.Option(
        False, "--accept-changed-parents", help="Resume even though a parent's files changed since the run began."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Search merge recipes with an evolutionary algorithm; resumable after any crash."""
    from evomerge.search.config import load_evolve_config

    # A mistake in the config is reported before torch, transformers and optuna are imported.
    parsed, _ = load_evolve_config(config)
    from evomerge.pipelines.evolve import evolve as run_evolve

    display = SearchProgress(err_console, budget=parsed.budget.candidates)
    with display.progress:
        outcome = run_evolve(
            config, run, on_candidate=display.candidate, on_status=display.status, workers=workers,
            accept_changed_parents=accept_changed_parents,
        )
    if as_json:
        print_json({"run": outcome.run_dir, "candidates": outcome.candidates, "champion": outcome.selection.champion,
                    "examples_saved": outcome.examples_saved, "test_results": outcome.test_results})
        return
    title = f"{outcome.candidates} candidates; champion = candidate {outcome.selection.champion}"
    console.print(results_table(outcome.test_results, title))


@app.command()
@interruptible(err_console, resumable=False)
def export(
    run: Path = typer.Argument(..., help="Run directory of an evolve."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory of the release packet."),
    candidate: str = typer.Option("champion", "--candidate", help="A trial number, or 'champion'."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory once complete."),
    license: str | None = typer.Option(None, help="The packet's license (default: the config's, else the parents')."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write a candidate as a release packet: weights, recipe, lineage, evaluation and model card."""
    from evomerge.lineage.packet import export_candidate

    with Progress(err_console, f"exporting candidate {candidate} of {run}"):
        path = export_candidate(run, candidate, out, overwrite=overwrite, license=license)
    if as_json:
        print_json({"run": run, "candidate": candidate, "out": path})
    else:
        console.print(f"exported candidate {candidate} of {run} to {path}")


@app.command()
@interruptible(err_console, resumable=True)
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where the zoo, the run and the champion go."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Candidates the search evaluates (default: 400)."),
    seed: int = typer.Option(0, help="Seed of the zoo and the search."),
    zoo: Path | None = typer.Option(None, help="Zoo directory (default: built once into ~/.cache/evomerge)."),
    start: Start = typer.Option(Start.init, "--start", help="CMA-ES start: every gene's init (the paper) or the best baseline."),
    vlm: bool = typer.Option(False, "--vlm", help="The vision-language demo: evolve a tiny Llava's language tower."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Build the tiny zoo, evolve a merge for its target task, export the champion, print the table."""
    from evomerge.pipelines.demo import DEMO_CANDIDATES, run_demo
    from evomerge.pipelines.demo_vlm import VLM_DEMO_CANDIDATES, run_vlm_demo

    display = SearchProgress(err_console, budget=budget or (VLM_DEMO_CANDIDATES if vlm else DEMO_CANDIDATES))
    with display.progress:
        outcome, summary = (run_vlm_demo if vlm else run_demo)(
            out, seed=seed, zoo_dir=zoo, start=start.value, on_candidate=display.candidate, on_status=display.status,
            **({} if budget is None else {"candidates": budget}),
        )
    if as_json:
        print_json(summary)
        return
    title = f"demo: target task '{summary['target_task']}', champion = {summary['champion']}"
    console.print(results_table(outcome.test_results, title))
    for label, paired in summary["comparison"].items():
        low, high = paired["ci95"]
        console.print(
            f"champion - {label.replace('_', ' ')} ({paired['name']}): {paired['difference']:+.3f} "
            f"(95% CI {low:+.3f} to {high:+.3f}, {paired['test'].replace('_', ' ')} p = {paired['p_value']:.2g}, "
            f"n = {paired['n']} test examples)"
        )
    console.print(f"summary: {out / 'summary.json'}   champion packet: {out / 'champion'}   report: {out / 'report.html'}")


@app.command("eval")
@interruptible(err_console, resumable=False)
def eval_command(
    model: str = typer.Argument(..., help="Local model directory (Hugging Face layout)."),
    task: list[str] = typer.Option(..., "--task", help="Task YAML file; repeat for several tasks."),
    split: Split = typer.Option(Split.search, "--split", help="The task split to score."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the scores as JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N examples per task."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Evaluate a model on task files and print score ± stderr per task."""
    # Everything the user typed is checked before the (slow) imports and model load, so mistakes fail fast.
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ConfigError(f"--out {out} must name a file in an existing directory")
    from evomerge.evaluate import EvalReport, Evaluator, load_causal_lm, load_task

    tasks = [load_task(path) for path in task]
    with Progress(err_console, f"loading {model}", total=len(tasks)) as progress:
        lm, tokenizer = load_causal_lm(model, device=device, allow_pickle=allow_pickle)
        evaluator = Evaluator(tokenizer, tasks, split.value, device=device, batch_size=batch_size)
        scores, seconds = {}, 0.0
        for loaded in tasks:  # one task at a time, so the bar moves
            progress.update(description=f"evaluating {loaded.name}")
            size = len(loaded.examples(split.value))
            chosen = {loaded.name: list(range(size if limit is None else min(limit, size)))}
            part = evaluator.evaluate(lm, indices=chosen)
            scores.update(part.scores)
            seconds += part.seconds
            progress.update(advance=1)
    report = EvalReport(split.value, scores, seconds)
    if out is not None:  # written whole or not at all
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        partial.replace(out)
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    table = Table(title=f"{model} on the {split.value} split")
    for column in ("task", "n", "score ± stderr", "tokens (prompt+gen)", "seconds"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, score in report.scores.items():
        tokens = f"{score.prompt_tokens}+{score.generated_tokens}"
        table.add_row(name, str(score.n), f"{score.score:.4f} ± {score.stderr:.4f}", tokens, f"{score.seconds:.2f}")
    console.print(table)


@app.command()
@interruptible(err_console, resumable=False)
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge's or mergekit's, auto-detected)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: Dtype | None = typer.Option(None, "--dtype", help="Output dtype; default: the parents'."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory once the merge succeeds."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Merge checkpoints as a recipe says and write a Hugging Face checkpoint with its model card."""
    from evomerge.merge.recipe import load_recipe
    from evomerge.merge.stream import run_merge

    parsed = load_recipe(recipe)
    if dtype is not None:
        parsed = parsed.model_copy(update={"out_dtype": dtype.value})
    with Progress(err_console, "merging tensors") as progress:
        result = run_merge(
            parsed,
            out,
            device=device,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            keep=(recipe,),
            on_plan=lambda total: progress.update(total=total),
            on_tensor=lambda _name: progress.update(advance=1),
        )
    if as_json:
        print_json({"out": result.out_dir, "tensors": result.num_tensors, "seconds": result.seconds})
    else:
        console.print(f"merged {result.num_tensors} tensors into {result.out_dir} in {result.seconds:.1f} s")


def run() -> None:
    """Console-script entry point: user errors exit 2 with one sentence, never a traceback."""
    # PyTorch's switch for transparent huge pages on CPU tensors of 2 MiB and more, read when torch first
    # allocates (torch is not imported yet). A merge allocates gigabytes of fresh tensors, and with 4 KiB
    # pages it spent most of its time in page faults: 10 fresh 128 MiB tensors took 328k faults and
    # 0.99 s, with huge pages 6k and 0.36 s (benchmarks/RESULTS.md). A user's own setting wins, and
    # kernels without transparent huge pages are left alone (torch would warn that its madvise failed).
    if Path(TRANSPARENT_HUGEPAGE).exists():
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Our own rich progress display is the one the user watches; transformers' tqdm bars ("Writing model
    # shards", once per saved model) would scroll through it. Read by huggingface_hub, which transformers asks.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # Not standalone, so that typer's usage errors come here: a wrong choice is one sentence like any
        # other user error, rather than a framed usage message.
        code = app(standalone_mode=False)
    except EvomergeError as error:
        sys.exit(report_error(error))
    except typer.BadParameter as error:
        sys.exit(report_error(ConfigError(option_sentence(error))))
    except TyperException as error:  # other usage errors (unknown option, missing argument): typer's message
        error.show()
        sys.exit(getattr(error, "exit_code", 2))
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 -- anything else is a bug in evomerge, reported as one
        sys.exit(report_internal_error(error))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()
