"""The `evomerge` command line: typer commands that parse, call the library and print.

Every user-caused error (an `EvomergeError`) becomes one sentence on stderr and exit code 2;
no traceback is shown for those.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging: merge, evaluate, evolve, export and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


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


def run() -> None:
    """Console-script entry point: user errors exit 2 with one sentence, never a traceback."""
    try:
        app()
    except EvomergeError as error:
        sys.exit(report_error(error))


if __name__ == "__main__":  # pragma: no cover
    run()
