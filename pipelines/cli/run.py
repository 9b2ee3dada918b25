"""`lum run --config run.yaml`, `lum demo` and `lum status`: the whole job end to end (pipelines/run/execute.py)."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from pipelines.cli.common import _friendly_errors
from pipelines.paths import RunPaths
from pipelines.run.config import RunConfig, load_run_config

# The simulator demo is written once, in configs/demo.yaml (and configs/demo-side-by-side.yaml, which extends it):
# `lum demo` runs those files, with its options as overrides. They belong to a source checkout (`git clone`).
DEMO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@click.command("run")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None, help="Run config (YAML); see `pipelines/run/config.py`.")
@click.option("--run", "run_dir", default=None, help="Override run_dir.")
@click.option("--force", is_flag=True,
              help="Redo the steps whose settings differ from those they ran with (and the steps depending on them), replacing their outputs.")
@click.option("--seeds", type=click.IntRange(1, 20), default=None,
              help="Override seeds: train the LM and rankers with N seeds (the report adds the lifts across seeds).")
@click.option("--holdout", type=click.Choice(["test", "validation"]), default=None,
              help="Override holdout: validation runs on the log without its test window (in run_dir/validation), to choose settings.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one setting of the config by its dotted key, the value read as YAML (repeatable): "
                   "--set rankers.dlrm.batch_size=2048 --set lm.pretrain.share_category=false")
@_friendly_errors
def run_command(config_path: str | None, run_dir: str | None, force: bool, seeds: int | None, holdout: str | None,
                settings: tuple[str, ...]) -> None:
    """Run every step (data ... report) from a config; finished steps are skipped, so it resumes after a failure.

    A step that ran with other settings than the config's is an error naming each changed setting; --force redoes it.
    """
    from pipelines.run.execute import execute

    overrides = {"run_dir": run_dir, "seeds": seeds, "holdout": holdout, **parse_settings(settings)}
    execute(load_run_config(config_path, overrides), echo=click.echo, force=force)


def parse_settings(settings: tuple[str, ...]) -> dict[str, object]:
    """`KEY=VALUE` pairs of --set as {dotted key: YAML value}; a malformed pair is a usage error naming it."""
    import yaml

    out: dict[str, object] = {}
    for pair in settings:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE with a dotted key, e.g. rankers.dlrm.batch_size=2048", param_hint="--set")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{pair!r}: the value is not YAML ({exc})", param_hint="--set") from exc
    return out


@click.command("demo")
@click.option("--run", "run_dir", default="runs/demo", type=click.Path(file_okay=False), help="Run folder.")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default="default", help="Simulator size.")
@click.option("--lm-preset", type=click.Choice(["tiny", "small", "base"]), default="tiny", help="Behaviour-LM size.")
@click.option("--epochs", type=int, default=5, help="Pretraining epochs (5: chosen on the validation window, configs/demo.yaml).")
@click.option("--snapshot-engine", type=click.Choice(["vllm", "torch"]), default="vllm", help="Engine of the daily snapshot job (the deployable features).")
@click.option("--rolling/--no-rolling", default=False,
              help="Also run the rolling features beside the snapshots (one embedding per request: the upper bound; configs/demo-side-by-side.yaml).")
@_friendly_errors
def demo(run_dir: str, preset: str, lm_preset: str, epochs: int, snapshot_engine: str, rolling: bool) -> None:
    """`lum run` on the embedded simulator: global split by time, daily vLLM snapshot features (deployable; with
    --rolling, rolling ones beside them: the upper bound), every ranker, the report."""
    from pipelines.run.execute import execute

    execute(demo_config(run_dir, preset, lm_preset, epochs, snapshot_engine, rolling), echo=click.echo)


def demo_config(run_dir: str = "runs/demo", preset: str = "default", lm_preset: str = "tiny", epochs: int = 5, snapshot_engine: str = "vllm",
                rolling: bool = False) -> RunConfig:
    """What `lum demo` runs: configs/demo.yaml (configs/demo-side-by-side.yaml with `rolling`), with the options as
    overrides (the defaults change nothing but the run folder, which is relative to the working directory)."""
    path = DEMO_CONFIGS / ("demo-side-by-side.yaml" if rolling else "demo.yaml")
    if not path.is_file():
        raise click.ClickException(f"`lum demo` runs {path.name} of the repository's configs/ folder, not found at {DEMO_CONFIGS}: "
                                   "run it from a source checkout (git clone), or `lum run --config` a config of your own")
    with path.open() as handle:
        protocols = yaml.safe_load(handle).get("protocols")
    overrides: dict = {"run_dir": run_dir, "data.preset": preset, "lm.pretrain.preset": lm_preset, "lm.pretrain.epochs": epochs}
    if snapshot_engine != "vllm":
        base = protocols or yaml.safe_load((DEMO_CONFIGS / "demo.yaml").read_text())["protocols"]
        overrides["protocols"] = [{**p, "engine": snapshot_engine} if p.get("features") == "snapshot" else p for p in base]
    return load_run_config(path, overrides)


@click.command("report")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A run folder `lum run` finished.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Write the report here [default: RUN/report].")
@_friendly_errors
def report_command(run_dir: str, out_dir: str | None) -> None:
    """Build the A/B report of a finished run again (after a code or template change, or into another folder)."""
    from pipelines.run.execute import rebuild_report

    rebuild_report(run_dir, out_dir)
    click.echo(f"report: {(out_dir or RunPaths(run_dir).root / 'report')}/report.html")


@click.command("status")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly_errors
def status_command(run_dir: str, as_json: bool) -> None:
    """Each step of a run: its state (done, running, failed, interrupted), settings hash, duration and whether it
    was reused. Exit code: 0 every step done, 1 a step failed or was interrupted (killed), 3 a step is running."""
    import json

    from tabulate import tabulate

    from pipelines.run.state import read_status, status_exit_code

    rows = read_status(RunPaths(run_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f", missingval=""))
        stopped = [r["step"] for r in rows if r["state"] in ("failed", "interrupted")]
        if stopped:
            click.echo(f"failed or interrupted: {', '.join(stopped)} (run `lum run` again with the same config to resume there)")
    code = status_exit_code(rows)
    if code:
        raise click.exceptions.Exit(code)
