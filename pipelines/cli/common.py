"""What every `lum` command shares: the default run folder, common options, friendly errors."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
from typing import Any, Callable

import click

from pipelines.data.contract import ContractError
from pipelines.steps import UP_TO_DATE  # noqa: F401  (re-exported for the commands)

DEFAULT_RUN = "runs/main"

run_option = click.option("--run", "run_dir", default=DEFAULT_RUN, type=click.Path(file_okay=False), help="Run folder.")
force_option = click.option("--force", is_flag=True, help="Replace what the run folder already holds.")

# `lum --debug` sets it (so that subprocess steps inherit it); LUM_DEBUG=1 asks the same from a scheduler's environment
DEBUG_ENV = "LUM_DEBUG"
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what shells, schedulers and `timeout` expect of a job stopped by Ctrl-C

# what an operator can do about the usual causes; any other errno is only named
_OS_HINTS = {
    errno.ENOSPC: "free space on that file system or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space or choose another folder",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "choose a folder this user may write (or fix its permissions)",
    errno.EPERM: "choose a folder this user may write (or fix its permissions)",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


# ---------------------------------------------------------------- logging: one format, warnings included
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
OUR_LOGGERS = ("lum", "feature_store", "ranker", "pipelines", "contracts")
# a warning whose category is one of these, raised from an installed package's own file, is that package's notice to
# its own developers (ibis calling a deprecated DuckDB method during every Feast read, fbgemm's kernels): nothing an
# operator can act on, so DEBUG (shown by -v), not WARNING
_LIBRARY_NOTICES = ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning")
# other known noise of the libraries, matched on the warning's message
NOISY_WARNINGS = (
    re.compile(r"TypedStorage is deprecated"),  # torch, from torchrec's and fbgemm's checkpoint code
    re.compile(r"is an experimental feature"),  # Feast, on every apply of a stream / on-demand view
)
_WARNING_LINE = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): (?P<message>.*)$")


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is written (click's test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class WarningsToLog(logging.Filter):
    """On `py.warnings` (logging.captureWarnings): one line per warning (its source line dropped), and the libraries'
    known noise (see NOISY_WARNINGS, _LIBRARY_NOTICES) lowered to DEBUG rather than dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().strip()
        first = text.splitlines()[0] if text else text
        record.msg, record.args = first, None
        found = _WARNING_LINE.match(first)
        installed = bool(found) and any(part in found["file"] for part in ("site-packages", "dist-packages"))
        noisy = (installed and found["category"] in _LIBRARY_NOTICES) or any(p.search(first) for p in NOISY_WARNINGS)
        if noisy and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure_logging(level: int) -> None:
    """The process's logging, set once (a second call only changes the levels): one stderr handler whose lines carry
    the time, level and logger name; our loggers at `level`; the libraries' (vLLM, Feast, transformers, TorchRec) at
    WARNING unless `level` is DEBUG; Python warnings routed through logging (`py.warnings`) with known noise lowered
    to DEBUG."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        root.addHandler(handler)
    root.setLevel(level if level == logging.DEBUG else logging.WARNING)
    for ours in OUR_LOGGERS:
        logging.getLogger(ours).setLevel(level)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
    if not any(isinstance(f, WarningsToLog) for f in warnings_log.filters):
        warnings_log.addFilter(WarningsToLog())


def debug_on() -> bool:
    """Whether errors keep their traceback (`lum --debug` or LUM_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: the path(s), the OS's reason, its errno name and what to do.

    A full disk, a read-only or foreign folder, a quota: these are the machine's state, not a bug, so the operator
    gets the path and the reason instead of 40 lines of traceback (`--debug` keeps them)."""
    code = exc.errno if isinstance(exc.errno, int) else None
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if paths:
        # pyarrow's and numpy's errors wrap the OS text in a longer one; os.strerror is the plain reason
        what = " -> ".join(paths) + ": " + (os.strerror(code) if code else exc.strerror or type(exc).__name__)
    else:  # no path attached (a library's own message, which often holds the path): its first line as it is
        what = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    name = f" [{errno.errorcode[code]}]" if code in errno.errorcode else ""
    hint = f"; {_OS_HINTS[code]}" if code in _OS_HINTS else ""
    return f"{what}{name}{hint} (--debug or {DEBUG_ENV}=1 shows the traceback)"


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
