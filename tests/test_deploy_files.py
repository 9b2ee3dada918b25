"""The deployment files (issue 35 item 4): the scheduler examples run commands and flags `lum` has, and the
Dockerfile installs exactly what the Makefile's `install` target does. Neither Airflow nor Docker is needed: the
DAG is read with `ast`, the Dockerfile and Makefile as text."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import click
import jinja2
import pytest
from click.testing import CliRunner

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "deploy" / "airflow" / "lum_daily.py"
CRON_FILE = REPO / "deploy" / "cron" / "lum-daily.cron"
DATE = "2025-03-03"


# ---------------------------------------------------------------- a `lum` command line against the real CLI
def check_lum_command(tokens: list[str]) -> str:
    """Asserts that `lum tokens...` names a command whose `--help` exits 0, passes only options it has (with a
    valid choice where it has choices) and as many positional arguments as it takes. Returns the command's path."""
    assert tokens[0] == "lum", tokens
    ctx = click.Context(main)
    command: click.Command = main
    path: list[str] = []
    rest = tokens[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"`lum {' '.join(path + [rest[0]])}`: no such command"
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    assert not isinstance(command, click.Group), f"`lum {' '.join(path)}` is a group, not a command"
    shown = CliRunner().invoke(main, [*path, "--help"])
    assert shown.exit_code == 0, shown.output

    options = {name: p for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    positional: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-") and token != "-":
            name, has_value, value = token.partition("=")
            assert name in options, f"`lum {' '.join(path)}` has no option {name} (it has {', '.join(sorted(options))})"
            option = options[name]
            takes_value = not option.is_flag and not option.count
            if takes_value and not has_value:
                assert i + 1 < len(rest), f"`lum {' '.join(path)} {name}` needs a value"
                value, i = rest[i + 1], i + 1
            if isinstance(option.type, click.Choice):
                assert value in option.type.choices, f"`lum {' '.join(path)} {name} {value}`: not one of {option.type.choices}"
        else:
            positional.append(token)
        i += 1
    assert len(positional) == len(arguments), f"`lum {' '.join(path)}` takes {len(arguments)} argument(s), got {positional}"
    return " ".join(path)


def test_the_checker_refuses_what_lum_does_not_have():
    """The checker itself: a misspelt flag, an unknown command and a bad choice are caught."""
    with pytest.raises(AssertionError, match="no option --as_of"):
        check_lum_command(["lum", "embed", "--as_of", DATE])
    with pytest.raises(AssertionError, match="no such command"):
        check_lum_command(["lum", "features", "materialise", "--run", "R"])
    with pytest.raises(AssertionError, match="not one of"):
        check_lum_command(["lum", "embed", "--engine", "onnx"])
    with pytest.raises(AssertionError, match="takes 1 argument"):
        check_lum_command(["lum", "features", "ingest", "--run", "R"])


# ---------------------------------------------------------------- the Airflow DAG
def dag_commands() -> list[tuple[str, str]]:
    """(task_id, bash_command rendered for DATE) of every BashOperator of the DAG file, read with `ast`."""
    tree = ast.parse(DAG_FILE.read_text())
    params: dict | None = None
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "DAG":
            params = ast.literal_eval(keywords["params"])
        elif name == "BashOperator":
            found.append((ast.literal_eval(keywords["task_id"]), ast.literal_eval(keywords["bash_command"])))
    assert params is not None and found, "the DAG file holds no DAG(params=...) or no BashOperator"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)  # an unknown template variable is an error
    return [(task, env.from_string(command).render(ds=DATE, params=params)) for task, command in found]


def test_airflow_dag_runs_existing_lum_commands_with_their_flags_and_the_logical_date():
    commands = dag_commands()
    assert [task for task, _ in commands] == ["import_events", "refresh_offline_tables", "embed_snapshot", "ingest", "materialize"]
    ran = [check_lum_command(shlex.split(command)) for _, command in commands]
    assert ran == ["data import files", "features apply", "embed", "features ingest", "features materialize"]
    embed = dict(commands)["embed_snapshot"]
    assert f"--as-of {DATE}" in embed and embed.endswith(f"/embeddings/{DATE}")
    assert dict(commands)["ingest"].split()[3].endswith(f"/embeddings/{DATE}")  # ingests the snapshot just written
    # the order of the tasks is the order of the jobs
    assert "import_events >> refresh_offline_tables >> embed_snapshot >> ingest >> materialize" in DAG_FILE.read_text()


# ---------------------------------------------------------------- the crontab
def cron_commands() -> list[tuple[str, list[str]]]:
    """(schedule, the commands of its && chain with $D as DATE) of every job line of the crontab."""
    jobs = []
    for line in CRON_FILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        fields = line.split(None, 5)
        schedule, command = " ".join(fields[:5]), fields[5].replace("\\%", "%")
        body = re.fullmatch(r"\((.*)\)\s*>>\s*\S+\s+2>&1", command)
        assert body, f"expected `(commands) >> LOG 2>&1`: {command}"
        steps = [s.strip() for s in body.group(1).split("&&")]
        assert steps[0] == "D=$(date -u +%F)", steps[0]  # the date, as Airflow's {{ ds }}
        jobs.append((schedule, [s.replace("$D", DATE) for s in steps[1:]]))
    return jobs


def test_cron_file_runs_the_same_lum_commands_with_the_date():
    jobs = cron_commands()
    assert len(jobs) == 1
    schedule, commands = jobs[0]
    assert re.fullmatch(r"(\S+ ){4}\S+", schedule) and schedule == "30 0 * * *"
    ran = [check_lum_command(shlex.split(command)) for command in commands]
    assert ran == ["data import files", "features apply", "embed", "features ingest", "features materialize"]
    assert f"--as-of {DATE}" in " ".join(shlex.split(commands[2]))
    # the same jobs as the DAG's, flag for flag (paths are the example's own in both)
    dag = [" ".join(shlex.split(c)) for _, c in dag_commands()]
    assert [" ".join(shlex.split(c)) for c in commands] == dag


# ---------------------------------------------------------------- the Dockerfile against the Makefile
def _normalized(command: str) -> list[str]:
    """A command's words with the interpreter written one way: `$(PIP)` and `/x/.venv/bin/python -m pip` are
    `python -m pip`, `$(PY)` and `/x/bin/python` are `python`."""
    command = command.replace("$(PIP)", "$(PY) -m pip")
    words = shlex.split(command)
    return ["python" if w in ("$(PY)", "$(PYTHON)") or re.fullmatch(r"\S*/bin/python3?", w) else w for w in words]


def makefile_install_commands() -> list[list[str]]:
    """The pip and python commands of the Makefile's install recipe (the `$(STAMP):` rule)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        line = line.strip()
        if line.startswith(("$(PIP)", "$(PY)")):
            recipe.append(_normalized(line))
    return recipe


def dockerfile_run_commands() -> list[list[str]]:
    """The commands of the Dockerfile's RUN instructions (continuations joined, `&&` chains split)."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            commands += [_normalized(part) for part in line[4:].split("&&")]
    return commands


def test_dockerfile_installs_what_the_makefile_installs():
    make = makefile_install_commands()
    docker = [c for c in dockerfile_run_commands() if c[:1] == ["python"]]
    assert make, "no install recipe found in the Makefile"
    # the same pip commands (constraints file, extras, --no-deps torchrec, the uninstall) and the import check, in order
    assert [c for c in docker if c[1:3] == ["-m", "pip"] or c[1:2] == ["-c"]] == make
    assert ["python", "-m", "venv", "/opt/lum/.venv"] in docker
    constraints = {c[c.index("-c") + 1] for c in make if "-c" in c and c[1:3] == ["-m", "pip"]}
    assert constraints == {"constraints/cpu.txt"}
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', (REPO / "Dockerfile").read_text(), re.M)
    assert entry and entry.group(1).endswith("/.venv/bin/lum")


def test_dockerignore_keeps_environments_and_runs_out_of_the_image():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", ".git", "build"} <= ignored
    # what the install needs stays in the build context
    for needed in ("pyproject.toml", "README.md", "constraints", "pipelines", "lum", "ranker", "feature_store", "contracts"):
        assert needed not in ignored
