"""What every `lum` command shares: the default run folder, common options, friendly errors."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from pipelines.data.contract import ContractError

DEFAULT_RUN = "runs/main"

run_option = click.option("--run", "run_dir", default=DEFAULT_RUN, type=click.Path(file_okay=False), help="Run folder.")
force_option = click.option("--force", is_flag=True, help="Replace what the run folder already holds.")


# What a step command returns when its output was already there and it did nothing: `lum run` then keeps the
# duration of the run that made the output instead of recording the check's fraction of a second.
UP_TO_DATE = "up to date"


def _friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures (bad input, missing steps) into a one-paragraph error and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ContractError, FileNotFoundError, FileExistsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper
