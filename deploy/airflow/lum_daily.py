"""The daily LUM feature jobs as an Airflow DAG (docs/deploy.md, "The jobs"): new events, the offline tables, the
snapshot embedding of every user through vLLM, its registration in Feast, and the online store.

    import events -> refresh offline tables -> embed snapshot -> ingest -> materialize

Copy this file into the DAGs folder of an Airflow (2.4+ or 3) whose workers have `lum` on their PATH (the Docker
image, or `make install`) and the run folder on a shared disk; set the params below. Every task is one `lum`
command (tests/test_deploy_files.py checks that each command and flag exists). The tasks are idempotent: the
embedding job resumes from its finished shards, an ingest of the same snapshot is a no-op, materialize continues
from its last run, so a failed task is simply retried. `lum` exits 1 with a one-line reason (a full disk names
the path) and 130 when interrupted; set LUM_DEBUG=1 in a task's env for the traceback.

The date: a CronTriggerTimetable makes the logical date `{{ ds }}` the day the run fires (00:30 UTC), in Airflow 2
and 3 alike, and the snapshot is "as of" that midnight: each user's vector from the events strictly before it,
i.e. every event of the day just finished. A backfill of a past day passes that day, as the cron file does.
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.timetables.trigger import CronTriggerTimetable

try:  # Airflow 3: the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

with DAG(
    dag_id="lum_daily",
    description="LUM user-interest features: daily snapshot embedding, Feast ingest and materialization",
    schedule=CronTriggerTimetable("30 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs would write the same run folder
    default_args={"retries": 2, "retry_delay": pendulum.duration(minutes=10)},
    params={
        "run": "/srv/lum/runs/main",  # the run folder (event log, model, Feast repo)
        "events": "/srv/lum/exports/events.parquet",  # the full event log, exported by the upstream system each night
        "model": "/srv/lum/runs/main/models/global-tiny",  # the behaviour LM (`lum pretrain`)
        "conditions": "surface=home,surface=search,surface=item_detail,surface=cart",
    },
    tags=["lum", "features"],
) as dag:
    import_events = BashOperator(
        task_id="import_events",
        # --force: the exported log changed since yesterday (new events); it is validated before it replaces the old one
        bash_command="lum data import files {{ params.events }} --condition surface --run {{ params.run }} --force",
    )
    refresh_offline_tables = BashOperator(
        task_id="refresh_offline_tables",
        bash_command="lum features apply --run {{ params.run }}",
    )
    embed_snapshot = BashOperator(
        task_id="embed_snapshot",
        bash_command=(
            "lum embed --model {{ params.model }} --events {{ params.run }}/data/events.parquet --as-of {{ ds }} "
            "--conditions {{ params.conditions }} --engine vllm --out {{ params.run }}/embeddings/{{ ds }}"
        ),
        execution_timeout=pendulum.duration(hours=6),
    )
    ingest = BashOperator(
        task_id="ingest",
        bash_command="lum features ingest {{ params.run }}/embeddings/{{ ds }} --run {{ params.run }}",
    )
    materialize = BashOperator(
        task_id="materialize",
        bash_command="lum features materialize --run {{ params.run }}",
    )

    import_events >> refresh_offline_tables >> embed_snapshot >> ingest >> materialize
