"""An embedding job in a process of its own: vLLM's engine processes then never outlive or disturb the caller.

    from lum.embed_process import embed_in_subprocess
    embed_in_subprocess(model_dir, events, "2025-03-03", out_dir, EmbedJobConfig(engine="vllm", conditions="surface=home"))

The child runs `python -m lum.embed_process` with the job's settings as validated JSON (the whole `EmbedJobConfig`),
so a step that wants the job isolated calls this function instead of reaching through a command line. `lum embed`
runs the same `run_job` in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from contracts.processes import die_with_parent
from lum.config import EmbedJobConfig


def leave_without_vllm_teardown() -> None:
    """End a finished vLLM job's process at once: vLLM's worker processes occasionally crash at interpreter exit after
    all results are written (about 1 run in 20, exit 134); the job is finished and recorded, so leave without teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_job(model_dir: str | Path, events: str | Path, as_of: str, out_dir: str | Path, config: EmbedJobConfig,
            for_rows: str | Path | None = None, ray_actors: int | None = None, ray_address: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Run (or resume) one embedding job in this process: (its manifest, the query conditions it asked)."""
    from lum.embed_job import AsOf, EmbeddingJob

    job = EmbeddingJob(model_dir, events, AsOf.parse(as_of, None if for_rows is None else str(for_rows)), out_dir, config)
    try:
        manifest = job.run(ray_actors=ray_actors, ray_address=ray_address)
    finally:
        job.close()
    return manifest, list(job.conditions)


def embed_in_subprocess(model_dir: Path, events: Path, as_of: str, out_dir: Path, job: EmbedJobConfig, conditions: str | None = None,
                        for_rows: Path | None = None) -> None:
    """`run_job` in a child process (killed with its parent), with `conditions` (comma-separated names) replacing
    the job's own when given. Raises RuntimeError when the child fails (its own message is on stderr)."""
    settings = json.dumps(asdict(job if conditions is None else replace(job, conditions=conditions)))
    command = [sys.executable, "-m", "lum.embed_process", "--model", str(model_dir), "--events", str(events), "--as-of", as_of,
               "--out", str(out_dir), "--settings-json", settings]
    if for_rows is not None:
        command += ["--for-rows", str(for_rows)]
    done = subprocess.run(command, preexec_fn=die_with_parent)  # a killed caller takes its embedding job with it
    if done.returncode != 0:
        raise RuntimeError(f"the embedding job failed (exit {done.returncode}): {' '.join(command[:12])} ...")


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: the arguments `embed_in_subprocess` passes."""
    from pydantic import TypeAdapter, ValidationError

    parser = argparse.ArgumentParser(prog="python -m lum.embed_process", description="One embedding job (what embed_in_subprocess starts).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--as-of", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings-json", required=True, help="the whole EmbedJobConfig as JSON")
    parser.add_argument("--for-rows", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    try:
        config = TypeAdapter(EmbedJobConfig).validate_python(json.loads(args.settings_json))
    except (ValueError, ValidationError) as exc:
        parser.error(f"--settings-json is not an EmbedJobConfig: {exc}")
    try:
        manifest, conditions = run_job(args.model, args.events, args.as_of, args.out, config, args.for_rows)
    except (ValueError, OSError) as exc:  # the job's own errors name the file or setting: one line, as `lum embed` prints them
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    totals = manifest["totals"]
    print(f"wrote {totals['rows']:,} user embeddings ({totals['users']:,} users, {len(conditions)} conditions) to {args.out}", flush=True)
    if config.engine == "vllm":
        leave_without_vllm_teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
