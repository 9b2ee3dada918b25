"""`lum serve`: the ranking service of a run (a trained ranker fed from the Feast online store; pipelines/serve.py).

    lum serve --run runs/demo [--model lightgbm|dlrm] [--variant lum] [--protocol global] [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import click

from contracts.names import VARIANTS
from pipelines.cli.common import run_option


@click.command("serve")
@click.option("--model", type=click.Choice(["lightgbm", "dlrm"]), default="lightgbm", help="Which trained ranker.")
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="lum", help="Which variant of it.")
@click.option("--protocol", default=None, help="Protocol key of the ranker folder rankers/<protocol>-<model>-<variant> "
              "[default: the run's first protocol's split].")
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the service to the network).")
@click.option("--port", type=int, default=8000)
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A model_spec.json (`lum ranker export`) the ranker's inputs must match [default: the ranker's own].")
@click.option("--threads", type=int, default=1, help="Compute threads of one request's model call (requests run side by side).")
@click.option("--access-log/--no-access-log", default=False, help="Log every request.")
@click.option("--allow-rolling", is_flag=True, help="Serve a LUM ranker from rolling features (refused by default: no batch job "
              "can compute a live request's rolling vector; for replays and debugging).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Larger request bodies are refused with 413.")
@click.option("--max-clock-age", default=None, metavar="DURATION",
              help="GET /healthz answers 503 when nothing was materialized for longer than this before now, e.g. 36h "
              "[default: not checked: a replay serves a store whose data lies in the past].")
@run_option
def serve_command(model, variant, protocol, host, port, spec_path, threads, access_log, allow_rolling, max_body_bytes,
                  max_clock_age, run_dir) -> None:
    """Serve POST /rank (scores of a user's candidates), POST /events, GET /healthz, GET /spec and GET /metrics until
    interrupted (Ctrl-C)."""
    from pathlib import Path

    import pandas as pd

    from pipelines.paths import RunPaths
    from pipelines.serve import RankingService, ServeError, default_protocol_key, ranker_folder, serve

    age = None
    if max_clock_age is not None:
        try:
            age = pd.Timedelta(max_clock_age)
        except ValueError as exc:
            raise click.BadParameter(f"'{max_clock_age}' is not a duration (e.g. 36h, 2d)", param_hint="--max-clock-age") from exc

    if not Path(run_dir).is_dir():
        raise click.BadParameter(f"{run_dir} is not a run folder", param_hint="--run")
    try:
        protocol = protocol or default_protocol_key(run_dir)
    except ServeError as exc:
        raise click.BadParameter(str(exc), param_hint="--protocol") from exc
    folder = ranker_folder(run_dir, model, variant, protocol)
    if not (folder / "ranker.json").exists():
        trained = sorted(p.name for p in (Path(run_dir) / "rankers").glob("*") if (p / "ranker.json").exists())
        raise click.BadParameter(f"{folder} holds no trained ranker (trained: {', '.join(trained) or 'none'})", param_hint="--model/--variant/--protocol")
    repo = RunPaths(run_dir).feature_repo_of(protocol)  # a second protocol on a split has its own repo (pipelines.paths)
    if not (repo / "data" / "materialized.json").exists():
        hint = (f"run `lum features materialize --run {run_dir}`" if repo == RunPaths(run_dir).feature_repo else
                "`lum run` fills the online store of each split's headline protocol only; a second protocol's rankers are for evaluation")
        raise click.BadParameter(f"{repo}: the online store was never materialized; {hint}", param_hint="--run")
    try:
        service = RankingService(folder, repo, spec_path=spec_path, threads=threads, allow_rolling=allow_rolling, max_clock_age=age)
    except (ServeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    health = service.health()
    for problem in health["problems"]:  # started anyway: /healthz answers 503 until the store is repaired
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"ranking with {folder} ({health['online_store']} online store, materialized until {health['materialized_until']}) "
               f"on http://{host}:{port}: POST /rank, POST /events, GET /healthz, GET /spec, GET /metrics; Ctrl-C stops it")
    serve(service, host=host, port=port, access_log=access_log, max_body_bytes=max_body_bytes)
