"""What every `lum` command shares: the default run folder, common options, friendly errors."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from pipelines.data.contract import ContractError
from pipelines.steps import UP_TO_DATE  # noqa: F401  (re-exported for the commands)

DEFAULT_RUN = "runs/main"

run_option = click.option("--run", "run_dir", default=DEFAULT_RUN, type=click.Path(file_okay=False), help="Run folder.")
force_option = click.option("--force", is_flag=True, help="Replace what the run folder already holds.")




def _friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures (bad input, missing steps) into a one-paragraph error and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ContractError, FileNotFoundError, FileExistsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper
