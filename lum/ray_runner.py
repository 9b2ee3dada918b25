"""Scale-out of the embedding job on Ray Data: a pool of engine actors, one shard per task, the same shards.

Each actor rebuilds the job from its class and arguments (handed over by the driver, so this module needs no
import of `lum.embed_job`, which imports it), opens its own engine once (torch on CPU; vLLM with
`num_gpus = tensor_parallel_size` on a GPU cluster), and for every shard it is handed streams that shard's
users out of the events file, embeds them and writes the shard file under a temporary name before renaming it.
The driver records each finished shard in the manifest as results arrive, so a Ray run resumes like a local one.

    lum embed ... --ray 4                     # local Ray instance with 4 actors
    lum embed ... --ray 8 --ray-address auto  # an existing cluster
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from contracts.embeddings import SHARD_COUNTS, ShardRecord


class ShardWorker:
    """A Ray Data callable class: one engine per actor, one shard per row."""

    def __init__(self, job_class: type, job_args: dict[str, Any], projection: np.ndarray | None):
        self.job = job_class(**job_args)
        self.job.open_engine()
        self.projection = projection

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [self.job.write_shard(int(shard), self.projection) for shard in batch["shard"]]
        return {
            "shard": np.asarray(batch["shard"]),
            "file": np.array([r.file for r in records]),
            **{k: np.array([r.counts[k] for r in records]) for k in SHARD_COUNTS},
        }


def run_shards_with_ray(
    job: Any, shards: list[int], projection: np.ndarray | None, actors: int, address: str | None = None
) -> Iterator[tuple[int, ShardRecord]]:
    """Yield (shard, its record for the manifest) as the actors finish shards."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    gpus = job.config.vllm.tensor_parallel_size if job.config.engine == "vllm" and ray.cluster_resources().get("GPU") else 0
    # one block per shard and no all-to-all step: every CPU goes to the engine actors
    dataset = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    results = dataset.map_batches(
        ShardWorker,
        fn_constructor_kwargs={"job_class": type(job), "job_args": job.constructor_args(), "projection": projection},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(shards))),
        num_cpus=1,
        num_gpus=gpus,
    )
    for row in results.iter_rows():
        yield int(row["shard"]), ShardRecord(str(row["file"]), {k: int(row[k]) for k in SHARD_COUNTS})
