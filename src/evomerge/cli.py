"""The `evomerge` command line: typer commands that parse, call the library and print.

Every user-caused error (an `EvomergeError`) becomes one sentence on stderr and exit code 2;
no traceback is shown for those.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from evomerge.errors import ConfigError, EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging: merge, evaluate, evolve, export and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
TRANSPARENT_HUGEPAGE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """Validate an option against its allowed values, suggesting the nearest one."""
    if value in allowed:
        return value
    hint = difflib.get_close_matches(value, allowed, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; choose one of {', '.join(allowed)}"
    raise ConfigError(f"option {option} got '{value}'{suggestion}")


def report_error(error: EvomergeError) -> int:
    """Print a user error as one sentence on stderr; return its exit code (2)."""
    message = " ".join(str(error).split())
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return error.exit_code


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


# --- commands ---------------------------------------------------------------------------------
# One block per command; keep them thin (parse, call the library, print).


@app.command("lineage")
def lineage_command(
    target: Path = typer.Argument(..., help="An exported model (directory with lineage.json) or a run directory."),
    format: str = typer.Option("text", "--format", help="text (tree), json or dot (Graphviz)."),
) -> None:
    """Show a model's ancestry across runs, back to the original checkpoints, with all its evidence."""
    import json

    from evomerge.lineage.dag import lineage, render_tree, to_dot

    fmt = _choice(format, ("text", "json", "dot"), "--format")
    graph = lineage(target)
    if fmt == "json":
        sys.stdout.write(json.dumps(graph.to_dict(), indent=2) + "\n")
    elif fmt == "dot":
        sys.stdout.write(to_dot(graph))
    else:
        console.print(render_tree(graph))


@app.command("report")
def report_command(
    run: Path = typer.Argument(..., help="Run directory of an evolve (finished or still running)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write; default RUN/report.html."),
    png_dir: Path | None = typer.Option(None, "--png-dir", help="Also write PNGs of the figures here (needs Chromium)."),
    watch: float | None = typer.Option(None, "--watch", min=1, help="Rewrite every SECONDS until Ctrl-C; the page reloads."),
) -> None:
    """Write the evolution report: one self-contained HTML file that opens without a network."""
    from evomerge.report.html import watch as watch_report
    from evomerge.report.html import write_report

    if watch is not None:
        watch_report(run, out, watch, lambda result: console.print(f"report written to {result.path}"))
        return
    result = write_report(run, out, png_dir=png_dir)
    console.print(f"report written to {result.path} ({len(result.sections)} sections)")
    for png in result.pngs:
        console.print(f"  {png}")


@app.command()
def worker(
    target: str = typer.Argument(..., help="Run directory, or the study's database URL (postgresql://...)."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: the run's config name)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda:N; default: the config's device."),
    max_candidates: int | None = typer.Option(None, "--max-candidates", min=1, help="Stop after N candidates here."),
    index: int = typer.Option(0, "--index", min=0, help="Worker number (seeds this worker's sampler)."),
    heartbeat: int = typer.Option(5, "--heartbeat", min=1, help="Seconds between this worker's heartbeats."),
    grace: int = typer.Option(60, "--grace", min=1, help="Seconds without a heartbeat before a trial is re-queued."),
) -> None:
    """Join a search: hold the parents on one device and evaluate candidates until the budget is spent."""
    from evomerge.search.worker import run_worker

    done = run_worker(target, study=study, device=device, index=index, max_candidates=max_candidates,
                      heartbeat_seconds=heartbeat, grace_seconds=grace)
    console.print(f"worker {index} evaluated {done} candidates")


@app.command()
def zoo(
    out: Path = typer.Argument(..., help="Directory of the zoo; an identical existing build is reused."),
    size: str = typer.Option("tiny", help="tiny (CPU, minutes) | small | medium (GPU)."),
    seed: int = typer.Option(0, help="Seed of data, initialisation and training."),
    force: bool = typer.Option(False, help="Rebuild even if an identical zoo exists."),
    family: str = typer.Option("text", "--family", help="text, or vlm: a tiny Llava grown from the text zoo's base."),
) -> None:
    """Build the tiny model family (base, specialists, task files) deterministically."""
    if _choice(family, ("text", "vlm"), "--family") == "vlm":
        if size != "tiny":
            raise ConfigError(f"--family vlm grows from the tiny text zoo only; drop --size {size}")
        _build_vlm_zoo(out, seed=seed, force=force)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from evomerge.zoo.builder import PRESETS, build_zoo

    preset = PRESETS[_choice(size, tuple(PRESETS), "--size")]
    total = preset.base.steps + sum(config.steps for _, _, config in preset.specialists)
    finished: dict[str, int] = {}
    progress = Progress(
        TextColumn("[bold]training {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True,
    )

    def advance(model: str, done: int, steps: int) -> None:
        finished[model] = done
        progress.update(bar, description=model, completed=sum(finished.values()))

    with progress:
        bar = progress.add_task("zoo", total=total)
        built = build_zoo(out, size=size, seed=seed, force=force, on_progress=advance)
    console.print(f"zoo ({size}, seed {seed}) at {built.root}: base {built.base}")
    for name, path in built.specialists.items():
        console.print(f"  specialist {name} ({built.skills[name]}): {path}")
    console.print(f"  tasks: {', '.join(built.tasks)}; target: {built.target_task}")


def _build_vlm_zoo(out: Path, *, seed: int, force: bool) -> None:
    from evomerge.zoo.vlm import build_vlm_zoo

    with err_console.status("building the VLM zoo (and the tiny text zoo it grows from)") as status:
        built = build_vlm_zoo(
            out, seed=seed, force=force, on_progress=lambda model, done, steps: status.update(f"training {model} {done}/{steps}")
        )
    console.print(f"VLM zoo (seed {seed}) at {built.root}: vlm {built.vlm}, language parent {built.language}")
    console.print(f"  tasks: {', '.join(built.tasks)}; target: {built.target_task}")


class _SearchDisplay:
    """Live view of a search: generation, best so far, candidates per minute, examples saved by racing."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=err_console, transient=True,
        )
        self.task = self.progress.add_task("search", total=None, info="")
        self.best: float | None = None
        self.count = 0
        self.saved = 0
        self.started = 0.0

    def status(self, message: str) -> None:
        self.progress.update(self.task, description=message)

    def candidate(self, result) -> None:
        import time

        if self.count == 0:
            self.started = time.monotonic()
        self.count += 1
        self.saved += result.examples_saved
        if result.status == "complete" and result.fitness is not None:
            self.best = result.fitness if self.best is None else max(self.best, result.fitness)
        rate = 60 * self.count / max(time.monotonic() - self.started, 1e-9)
        best = "-" if self.best is None else f"{self.best:.4f}"
        info = f"gen {result.generation}  best {best}  {rate:.0f}/min  saved {self.saved} examples (racing or estimates)"
        self.progress.update(self.task, description="candidates", advance=1, info=info)


def _print_results(test_results: dict, title: str) -> None:
    from rich.table import Table

    tasks = sorted({task for result in test_results.values() for task in (result.get("test") or {})})
    table = Table(title=title)
    table.add_column("model")
    table.add_column("role")
    for task in tasks:
        table.add_column(f"{task} (test)", justify="right")
    for name, result in test_results.items():
        role = ", ".join(result.get("roles", [result["kind"]]))
        cells = []
        for task in tasks:
            entry = (result.get("test") or {}).get(task)
            cells.append("-" if entry is None else f"{entry['score']:.3f} ± {entry['stderr'] or 0:.3f}")
        table.add_row(name, role, *cells)
    console.print(table)


@app.command()
def evolve(
    config: Path = typer.Argument(..., help="Evolve config YAML."),
    run: Path = typer.Option(..., "--run", help="Run directory; an existing one is resumed."),
    workers: int = typer.Option(1, "--workers", min=1, help="Evaluate candidates in N worker processes."),
    accept_changed_parents: bool = typer.Option(
        False, "--accept-changed-parents", help="Resume even though a parent's files changed since the run began."
    ),
) -> None:
    """Search merge recipes with an evolutionary algorithm; resumable after any crash."""
    from evomerge.pipelines.evolve import evolve as run_evolve

    display = _SearchDisplay()
    with display.progress:
        outcome = run_evolve(
            config, run, on_candidate=display.candidate, on_status=display.status, workers=workers,
            accept_changed_parents=accept_changed_parents,
        )
    _print_results(outcome.test_results, f"{outcome.candidates} candidates; champion = candidate {outcome.selection.champion}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory of an evolve."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory of the release packet."),
    candidate: str = typer.Option("champion", help="A trial number, or 'champion'."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory once complete."),
    license: str | None = typer.Option(None, help="The packet's license (default: the config's, else the parents')."),
) -> None:
    """Write a candidate as a release packet: weights, recipe, lineage, evaluation and model card."""
    from evomerge.lineage.packet import export_candidate

    path = export_candidate(run, candidate, out, overwrite=overwrite, license=license)
    console.print(f"exported candidate {candidate} of {run} to {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where the zoo, the run and the champion go."),
    candidates: int | None = typer.Option(None, min=1, help="Evaluation budget of the search (default: 400)."),
    seed: int = typer.Option(0, help="Seed of the zoo and the search."),
    zoo: Path | None = typer.Option(None, help="Zoo directory (default: built once into ~/.cache/evomerge)."),
    start: str = typer.Option("init", help="CMA-ES start: init (every gene's init, the paper) or best_baseline."),
    vlm: bool = typer.Option(False, "--vlm", help="The vision-language demo: evolve a tiny Llava's language tower."),
) -> None:
    """Build the tiny zoo, evolve a merge for its target task, export the champion, print the table."""
    from evomerge.pipelines.demo import run_demo
    from evomerge.pipelines.demo_vlm import run_vlm_demo

    display = _SearchDisplay()
    with display.progress:
        budget = {} if candidates is None else {"candidates": candidates}
        outcome, summary = (run_vlm_demo if vlm else run_demo)(
            out, seed=seed, zoo_dir=zoo, start=_choice(start, ("init", "best_baseline"), "--start"),
            on_candidate=display.candidate, on_status=display.status, **budget,
        )
    _print_results(outcome.test_results, f"demo: target task '{summary['target_task']}', champion = {summary['champion']}")
    for label, paired in summary["comparison"].items():
        low, high = paired["ci95"]
        console.print(
            f"champion - {label.replace('_', ' ')} ({paired['name']}): {paired['difference']:+.3f} "
            f"(95% CI {low:+.3f} to {high:+.3f}, {paired['test'].replace('_', ' ')} p = {paired['p_value']:.2g}, "
            f"n = {paired['n']} test examples)"
        )
    console.print(f"summary: {out / 'summary.json'}   champion packet: {out / 'champion'}   report: {out / 'report.html'}")


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Local model directory (Hugging Face layout)."),
    task: list[str] = typer.Option(..., "--task", help="Task YAML file; repeat for several tasks."),
    split: str = typer.Option("search", "--split", help="search or test."),
    json_out: str | None = typer.Option(None, "--json", help="Also write the scores as JSON here."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N examples per task."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin weights."),
) -> None:
    """Evaluate a model on task files and print score ± stderr per task."""
    import json
    from pathlib import Path

    from rich.table import Table

    from evomerge.evaluate import Evaluator, check_split, load_causal_lm, load_task

    # Validate everything the user typed before the (slow) model load, so mistakes fail fast.
    tasks = [load_task(path) for path in task]
    check_split(split)
    if json_out is not None and (Path(json_out).is_dir() or not Path(json_out).parent.is_dir()):
        raise ConfigError(f"--json {json_out} must name a file in an existing directory")
    lm, tokenizer = load_causal_lm(model, device=device, allow_pickle=allow_pickle)
    evaluator = Evaluator(tokenizer, tasks, split, device=device, batch_size=batch_size)
    report = evaluator.evaluate(lm, limit=limit)
    table = Table(title=f"{model} on the {split} split")
    for column in ("task", "n", "score ± stderr", "tokens (prompt+gen)", "seconds"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, score in report.scores.items():
        tokens = f"{score.prompt_tokens}+{score.generated_tokens}"
        table.add_row(name, str(score.n), f"{score.score:.4f} ± {score.stderr:.4f}", tokens, f"{score.seconds:.2f}")
    console.print(table)
    if json_out is not None:  # written whole or not at all
        partial = Path(json_out).with_name(f".{Path(json_out).name}.partial")
        partial.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        partial.replace(json_out)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge's or mergekit's, auto-detected)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    device: str = typer.Option("cpu", help="Device to merge on: cpu, cuda, cuda:N."),
    dtype: str | None = typer.Option(None, help="Output dtype (float32, float16, bfloat16); default: the parents'."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory once the merge succeeds."),
    allow_pickle: bool = typer.Option(False, help="Allow loading pickle (.bin) checkpoints; they can run code."),
) -> None:
    """Merge checkpoints as a recipe says and write a Hugging Face checkpoint with its model card."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.merge.recipe import load_recipe
    from evomerge.merge.stream import run_merge

    parsed = load_recipe(recipe)
    if dtype is not None:
        parsed = parsed.model_copy(update={"out_dtype": _choice(dtype, ("float32", "float16", "bfloat16"), "--dtype")})
    with Progress(
        TextColumn("[bold]merging[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        bar = progress.add_task("tensors", total=None)
        result = run_merge(
            parsed,
            out,
            device=device,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            keep=(recipe,),
            on_plan=lambda total: progress.update(bar, total=total),
            on_tensor=lambda _name: progress.advance(bar),
        )
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
        app()
    except EvomergeError as error:
        sys.exit(report_error(error))
    except Exception as error:  # noqa: BLE001 -- anything else is a bug in evomerge, reported as one
        sys.exit(report_internal_error(error))


if __name__ == "__main__":  # pragma: no cover
    run()
