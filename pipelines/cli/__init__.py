"""The `lum` command line (one module per command group; the steps they run live in pipelines.steps).

    lum --version | -v | -q | --no-progress | --debug ...

    lum [--defaults defaults.yaml] data make --preset tiny|default|large
    lum data import movielens PATH
    lum data import files EVENTS [--items ITEMS] [--map user_id=userId ...] [--condition surface ...]
    lum data validate PATH
    lum data split --protocol global|per-user
    lum data describe [RUN_OR_FILE]
    lum pretrain | evaluate | embed                 the behaviour LM and its embeddings
    lum features apply | ingest | materialize | get | serve | training-set    the Feast feature store
    lum ranker train | evaluate | score             DLRM and LightGBM rankers
    lum run --config run.yaml                       every step, data to report, resumable
    lum demo                                        `lum run` on the embedded simulator
    lum status --run DIR                            each step of a run: state, settings hash, duration
    lum report --run DIR [--out DIR]                the A/B report of a finished run, built again
    lum serve --run DIR [--model --variant --port]  the ranking service: POST /rank, GET /healthz, GET /spec

A YAML file given to `--defaults` sets the default of any option, nested by command name (not a run config: that
is `lum run --config`), e.g.

    data:
      make: {preset: default, seed: 7}
      split: {protocol: per-user, fractions: [0.6, 0.2, 0.2]}

Flags given on the command line win over the file.

Exit codes: 0 done, 1 an error (one line naming the file, flag or value; an operating-system error such as a full
disk or a read-only folder names the path and the OS's reason; `--debug` or LUM_DEBUG=1 adds the traceback),
2 a usage error, 130 interrupted (Ctrl-C / SIGINT).
"""

from __future__ import annotations

# OpenMP reads its wait policy and thread count once, when torch, LightGBM or numpy's OpenBLAS load it: set both from
# the CPUs this process may really use (affinity, cgroup quota) before anything can load them (contracts/threads.py)
from contracts.threads import prepare_openmp_env

prepare_openmp_env()
# ruff: noqa: E402  (hence the imports below the call)

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import yaml

from contracts.progress import PROGRESS_ENV, bars_off
from pipelines.cli.common import DEBUG_ENV, INTERRUPTED_EXIT, configure_logging, debug_on, os_error_message


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read config {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"config {path} must be a mapping of command names to options")
    problems = _unknown_defaults(ctx, ctx.command, loaded, "")
    if problems:  # a misspelt option would otherwise be ignored and its default used without a word
        raise click.BadParameter(f"config {path}: " + "; ".join(problems))
    ctx.default_map = loaded
    return value


def _unknown_defaults(ctx: click.Context, command: click.Command, mapping: dict, where: str) -> list[str]:
    """The keys of an option-defaults mapping that name no sub-command or option of `command`, with a hint."""
    import difflib

    if isinstance(command, click.Group):
        known = list(command.list_commands(ctx))
        options = [p.name for p in command.params if isinstance(p, click.Option) and p.name]
    else:
        known, options = [], [p.name for p in command.params if p.name]
    problems = []
    for key, value in mapping.items():
        at = f"{where}.{key}" if where else str(key)
        if key in known:
            sub = command.get_command(ctx, key)  # type: ignore[union-attr]
            if isinstance(value, dict):
                problems += _unknown_defaults(ctx, sub, value, at)
            else:
                problems.append(f"{at}: expected a mapping of {key}'s options")
        elif key not in options:
            close = difflib.get_close_matches(str(key), known + options, n=1)
            problems.append(f"{at}: no such command or option" + (f" (did you mean {close[0]}?)" if close else ""))
    return problems


@contextmanager
def _operating_errors() -> Iterator[None]:
    """Ctrl-C: one line and exit 130; an OS error (full disk, read-only or foreign folder, quota): one line naming
    the path and the reason, exit 1. Other exceptions are bugs and keep their traceback."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("\nlum: interrupted", err=True)  # the newline ends the terminal's ^C echo
        raise click.exceptions.Exit(INTERRUPTED_EXIT) from None
    except OSError as exc:
        if exc.errno == errno.EPIPE or debug_on():  # a closed pipe (`lum ... | head`): click's own quiet handling
            raise
        raise click.ClickException(os_error_message(exc)) from exc


class LumGroup(click.Group):
    """The top-level group: `_operating_errors` around parsing (a --config read can block or fail) and the command."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        with _operating_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _operating_errors():
            return super().invoke(ctx)


@click.group(cls=LumGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--defaults",
    type=click.Path(exists=True, dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="YAML file with option defaults, nested by command name (see `lum --help`); not a run config (`lum run --config`).",
)
# the former name of --defaults, which read like `lum run --config` (a run config, another format): still accepted
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
              hidden=True)
@click.version_option(metadata.version("lum-user-model"), "--version", prog_name="lum")
@click.option("-v", "--verbose", "verbosity", flag_value="DEBUG", help="Log debug messages.")
@click.option("-q", "--quiet", "verbosity", flag_value="WARNING", help="Log warnings and errors only.")
@click.option("--log-level", "log_level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None, help="Log level [default: INFO].")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on when stderr is a terminal].")
@click.option("--debug", is_flag=True, default=False, help=f"Show the traceback of an error, not only its one-line message (also {DEBUG_ENV}=1).")
def main(verbosity: str | None, log_level: str | None, progress: bool | None, debug: bool) -> None:
    """LUM-style user-model features for an existing ranker."""
    if debug:  # in the environment, so that the steps run as subprocesses (embedding job, torchrun) inherit it
        os.environ[DEBUG_ENV] = "1"
    level = getattr(logging, log_level or verbosity or "INFO")
    configure_logging(level)  # our loggers at `level`, the libraries' at warnings unless -v; warnings through logging
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if level == logging.DEBUG else "WARNING")
    if progress is not None:  # unset: bars only when stderr is a terminal (contracts/progress.py)
        os.environ[PROGRESS_ENV] = "1" if progress else "0"
    if bars_off():
        # the Hugging Face libraries draw their own bars (loading and saving weights); they read this when imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


from pipelines.cli.data import data  # noqa: E402  (command groups kept in their own modules)
from pipelines.cli.features import features  # noqa: E402
from pipelines.cli.lm import embed_command, evaluate_command, pretrain_command, retrieve_command  # noqa: E402
from pipelines.cli.ranker import ranker  # noqa: E402
from pipelines.cli.run import demo, report_command, run_command, status_command  # noqa: E402
from pipelines.cli.serve import serve_command  # noqa: E402

for command in (data, pretrain_command, evaluate_command, embed_command, retrieve_command, features, ranker, run_command, demo, report_command, status_command,
                serve_command):
    main.add_command(command)

if __name__ == "__main__":
    main()
