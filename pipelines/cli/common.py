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
        except Exception as exc:
            if _is_connection_error(exc):  # an online store (Redis) or server that does not answer: say which, not 80 lines
                raise click.ClickException(f"cannot connect: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}. "
                                           "Is the Redis server (or feature server) running at the address in the repo's "
                                           "feature_store.yaml / --redis-url / --http?") from exc
            raise

    return wrapper


def _is_connection_error(exc: BaseException) -> bool:
    """A refused or reset connection, however the client library wraps it (redis, requests, the OS)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module, name = type(exc).__module__, type(exc).__name__
        if (isinstance(exc, ConnectionError) or (module.startswith(("redis", "requests", "urllib3")) and "Connection" in name)
                or ("redis" in module and name == "TimeoutError")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
