"""Pretraining throughput: real (non-padding) tokens/s and model FLOPs utilisation, with and without packing.

    python -m benchmarks.bench_pretrain                 # tiny and small presets, 3,000 simulated users
    python -m benchmarks.bench_pretrain --users 20000 --steps 60

MFU = achieved model FLOPs / peak FLOPs, with model FLOPs = 6 x (non-embedding parameters + the output rows
scored) per real token + the attention term 12 x layers x hidden x context, and "peak" the fp32 matmul
throughput measured on this machine with the same thread count (CPUs publish no single peak number).
Both modes see the same segments; without packing every row holds one user padded to the longest in its batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_results


def measured_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--presets", default="tiny,small")
    args = parser.parse_args()

    from lum.model import PRESETS
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import TokenizerConfig
    from pipelines.data.sources.simulator import preset, simulate

    events, items = simulate(preset("default", n_users=args.users, chunk_users=args.users))
    frame, item_frame = events.to_pandas(), items.to_pandas()
    peak = measured_peak_flops()
    table = []
    for preset_name in args.presets.split(","):
        p = PRESETS[preset_name]
        body_params = p.num_layers * (4 * p.hidden_size**2 + 3 * p.hidden_size * p.intermediate_size)
        for packing in (False, True):
            config = PretrainConfig(
                preset=preset_name, epochs=50, max_steps=args.steps, rows_per_batch=8, row_tokens=512,
                packing=packing, checkpoint_every=10**9,
            )
            with tempfile.TemporaryDirectory() as tmp:
                manifest = pretrain(
                    frame, Path(tmp) / "m", config, TokenizerConfig(("surface", "device", "daypart"), max_history=100), item_frame, progress=False
                )
                log = json.loads((Path(tmp) / "m" / "training_log.json").read_text())
            # training steps only, after 3 warm-up steps (tokenization and saving are not counted)
            timed = log[3:]
            seconds = timed[-1]["seconds"] - log[2]["seconds"]
            real = sum(x["real_tokens"] for x in timed)
            padded = sum(x["padded_tokens"] for x in timed)
            # 6 x body parameters per token, plus attention scores over about half a 512-token row
            flops_per_token = 6 * body_params + 12 * p.num_layers * p.hidden_size * 256
            table.append(
                {
                    "preset": preset_name,
                    "packing": packing,
                    "steps": len(log),
                    "real_tokens": real,
                    "seconds": round(seconds, 2),
                    "real_tokens_per_s": round(real / seconds),
                    "mfu_vs_measured_matmul": round(flops_per_token * real / seconds / peak, 4),
                    "non_padding_share": round(real / padded, 3),
                    "vocab": manifest["vocab_size"],
                }
            )
    for preset_name in args.presets.split(","):
        packed = next(r for r in table if r["preset"] == preset_name and r["packing"])
        unpacked = next(r for r in table if r["preset"] == preset_name and not r["packing"])
        packed["packing_speedup"] = round(packed["real_tokens_per_s"] / unpacked["real_tokens_per_s"], 2)
    write_results(
        "pretrain",
        table,
        notes=f"simulator default world, {args.users} users; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
        "time covers training steps 4.. only",
    )


if __name__ == "__main__":
    main()
