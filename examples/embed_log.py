"""Embed an event log with a trained behaviour LM, from Python.

Shows `lum.embed_job.EmbeddingJob`, the job behind `lum embed`: a run folder's LM reads each user's behaviours
strictly before an as-of time and gives one vector per (user, query condition), written as a sharded, resumable
embedding folder (docs/embeddings.md) and read back as one Arrow table.

Run it on a finished `lum run` folder (the log is its data/events.parquet, the LM its models/<split>-<preset>):

    python examples/embed_log.py runs/demo --conditions surface=home,surface=search --out /tmp/demo-embeddings
"""

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from lum.config import EmbedJobConfig
from lum.embed_job import AsOf, EmbeddingJob, read_user_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `lum run` folder")
    parser.add_argument("--conditions", default="all", help="`all` or comma-separated query conditions, e.g. surface=home")
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch", help="vllm is the production engine")
    parser.add_argument("--out", type=Path, default=None, help="embedding folder to write [default: a temporary one]")
    args = parser.parse_args()

    models = sorted(p.parent for p in args.run.glob("models/*/lum_manifest.json") if not p.parent.name.endswith(".partial"))
    if not models:
        raise SystemExit(f"{args.run}: no trained LM under models/ (run `lum run` first)")
    events = args.run / "data" / "events.parquet"
    last_event = pq.read_table(events, columns=["ts"]).column("ts").to_pandas().max()
    as_of = AsOf(times=(last_event + pd.Timedelta(seconds=1),))  # every event of the log is strictly before it
    out = args.out or Path(tempfile.mkdtemp()) / "embeddings"
    job = EmbeddingJob(models[0], events, as_of, out, EmbedJobConfig(engine=args.engine, conditions=args.conditions, shards=1))
    try:
        manifest = job.run(progress=False)
    finally:
        job.close()  # the engine holds the model (and, for vLLM, its worker processes)

    table = read_user_embeddings(out)  # user_id, condition, embedding, event_timestamp, model_version
    first = table.slice(0, 1).to_pylist()[0]
    print(f"model {manifest['settings']['model_version']}: {table.num_rows} vectors of {manifest['embedding_dim']} floats "
          f"({manifest['totals']['users']} users) as of {as_of.describe()} in {out}")
    print(f"first: user {first['user_id']}, condition {first['condition']}: {[round(x, 3) for x in first['embedding'][:4]]} ...")


if __name__ == "__main__":
    main()
