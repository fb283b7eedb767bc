"""The `evomerge` command line: typer commands that parse, call the library and print.

Every user-caused error (an `EvomergeError`) becomes one sentence on stderr and exit code 2;
no traceback is shown for those.
"""

from __future__ import annotations

import difflib
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


# --- commands ---------------------------------------------------------------------------------
# One block per command; keep them thin (parse, call the library, print).


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
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


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

    from evomerge.lineage.card import CardInfo, render_model_card
    from evomerge.merge.planner import run_merge
    from evomerge.merge.recipe import load_recipe

    parsed = load_recipe(recipe)
    if dtype is not None:
        parsed = parsed.model_copy(update={"out_dtype": _choice(dtype, ("float32", "float16", "bfloat16"), "--dtype")})
    card = render_model_card(
        CardInfo(
            name=parsed.name or out.name,
            method=parsed.method,
            parents=parsed.parent_refs(),
            base_model=parsed.base_model,
            recipe_yaml=parsed.to_yaml(),
        )
    )
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
            extra_files={"README.md": card},
            on_plan=lambda total: progress.update(bar, total=total),
            on_tensor=lambda _name: progress.advance(bar),
        )
    console.print(f"merged {result.num_tensors} tensors into {result.out_dir} in {result.seconds:.1f} s")


def run() -> None:
    """Console-script entry point: user errors exit 2 with one sentence, never a traceback."""
    try:
        app()
    except EvomergeError as error:
        sys.exit(report_error(error))


if __name__ == "__main__":  # pragma: no cover
    run()
