"""Pretraining the behaviour LM: next-condition-item prediction (LUM step 1, "knowledge construction").

At every condition token the model predicts the item that follows, with a full softmax over the item side of
the vocabulary (item, category and, in semantic mode, code tokens). Why full softmax and not the sampled softmax
/ InfoNCE of the LUM paper: our catalogues (thousands to ~100k item tokens) fit a full softmax on the rows that
carry a loss (only condition positions are scored, never the whole vocabulary at every position), the gradient
is exact, and no negative-sampling bias needs correcting. A sampled softmax pays off past millions of items.

One process or many (`torchrun --nproc_per_node=N`, FSDP2 `fully_shard` over the decoder layers; gloo on CPU,
NCCL on GPU). Every global batch is split by rows across ranks and the loss is normalised by the global number
of targets, so N processes follow the 1-process loss curve. AdamW, linear warmup then cosine decay, gradient
clipping, optional bf16 autocast, a progress bar with loss and real (non-padding) tokens/s, checkpoints every
`checkpoint_every` steps and resume from the last one (same data order, same result).

Output: a finished model folder appears only at the end (it is assembled in `<out>.partial/` and renamed):
HF checkpoint (config.json + safetensors), the behaviour tokenizer, a WordLevel HF tokenizer for vLLM,
`lum_manifest.json` and `training_log.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

from contracts.files import atomic_path
from contracts.progress import bars_off
from contracts.threads import default_threads
from lum.config import PretrainConfig  # noqa: F401  (re-exported)
from lum.item_factors import ItemFactors, item_side_facts
from lum.model import build_model, data_fingerprint, get_preset, llama_config, save_hf_tokenizer, weights_digest, write_manifest
from lum.model_card import write_model_card
from lum.sequences import Batch, make_batch, plan_epochs, user_segments
from lum.tokenizer import BehaviourTokenizer, TokenizerConfig, fit_tokenizer

CHECKPOINT_FILE = "checkpoint.pt"


class NextItemObjective(torch.nn.Module):
    """Wraps the LM: hidden states at loss positions -> logits over the item side -> summed cross-entropy.

    With `factors` (lum/item_factors.py) every token's input embedding and output row get their shared category and
    content components added; `ItemFactors.fold_into` makes the saved plain model compute exactly the same.
    """

    def __init__(self, model: LlamaForCausalLM, item_side_ids: np.ndarray, factors: ItemFactors | None = None):
        super().__init__()
        self.model = model
        self.factors = factors
        self.register_buffer("item_side_ids", torch.as_tensor(item_side_ids, dtype=torch.long), persistent=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (summed loss over targets, number of correct top-1 predictions)."""
        embeds = self.model.model.embed_tokens(batch.input_ids)  # [B, T, H]
        head = self.model.lm_head.weight[self.item_side_ids]  # [V_item, H]
        if self.factors is not None:
            embeds = embeds + self.factors.input_offsets(batch.input_ids)
            head = head + self.factors.output_offsets(self.item_side_ids)
        hidden = self.model.model(
            inputs_embeds=embeds,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).last_hidden_state  # [B, T, H]
        where = batch.targets >= 0
        picked = hidden[where]  # [P, H]
        logits = picked @ head.T  # [P, V_item]
        target = batch.targets[where]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        correct = (logits.argmax(dim=-1) == target).sum()
        return loss, correct


def item_index_of(tokenizer: BehaviourTokenizer) -> np.ndarray:
    """[V] index of each token id on the item side, -1 for the others."""
    index = np.full(tokenizer.vocab_size, -1, dtype=np.int64)
    side = tokenizer.item_side_ids()
    index[side] = np.arange(len(side))
    return index


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return rank, world


def _all_sum(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _shard(objective: NextItemObjective) -> None:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    for layer in objective.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)


def _full_states(objective, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(objective, options=options), get_optimizer_state_dict(objective, optimizer, options=options)


def _load_states(objective, optimizer, model_state: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(objective, model_state, options=options)
    set_optimizer_state_dict(objective, optimizer, optim_state, options=options)


def _load_checkpoint(path: Path, partial: Path) -> dict[str, Any]:
    """A resume checkpoint, read without unpickling arbitrary objects: a `.partial/` folder is a place another user
    or process can write to, and a pickled payload there would run as this process. `weights_only=True` admits
    tensors and plain containers of numbers and strings, which is all a checkpoint this code writes holds."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or RuntimeError for a truncated file)
        raise ValueError(f"{path} is not a resume checkpoint this code wrote (it holds objects other than tensors and plain values, "
                         f"or is damaged: {str(exc).splitlines()[0][:200]}); remove {partial} to start over") from None
    if not isinstance(state, dict) or not {"settings", "step", "log", "model", "optimizer", "scheduler"} <= set(state):
        raise ValueError(f"{path} is not a resume checkpoint this code wrote (missing keys); remove {partial} to start over")
    return state


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:  # a checkpoint is complete or absent, never half written
        torch.save(obj, tmp)


def window_facts(events: pd.DataFrame) -> dict[str, Any]:
    return {
        "events": int(len(events)),
        "users": int(events["user_id"].nunique()),
        "ts_min": str(events["ts"].min()) if len(events) else None,
        "ts_max": str(events["ts"].max()) if len(events) else None,
    }


def pretrain(
    events: pd.DataFrame,
    out_dir: str | Path,
    config: PretrainConfig,
    tokenizer_config: TokenizerConfig | None = None,
    items: pd.DataFrame | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain (or continue pretraining from `init_from`) on `events`, all of which must be before the cut-off.

    Returns the manifest. Resumes from `<out>.partial/checkpoint.pt` when one exists for the same settings.
    """
    from lum.continued import extend_for_window, load_for_continued_pretraining

    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    rank, world = _dist_info()
    torch.set_num_threads(config.threads or default_threads())  # the CPU quota's, not the host's core count
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; choose another folder or allow overwriting (--force)")
    if events.empty:
        raise ValueError("the pretraining window holds no events: choose an earlier cut-off or check the split")
    if config.rows_per_batch % world:
        raise ValueError(f"rows_per_batch ({config.rows_per_batch}) must be a multiple of the number of processes ({world})")

    # vocabulary and model
    if init_from is not None:
        base_tokenizer, base_model, base_manifest = load_for_continued_pretraining(init_from)
        tokenizer = extend_for_window(base_tokenizer, events, items)
    else:
        if tokenizer_config is None:
            raise ValueError("a tokenizer config is needed to pretrain from scratch")
        tokenizer, base_model, base_manifest = fit_tokenizer(events, tokenizer_config, items), None, None
    tpb = 1 + tokenizer.config.tokens_per_item
    fill = tokenizer.config.prompt_align
    max_behaviours = min(tokenizer.config.max_history, (config.row_tokens - fill) // tpb)  # room for the longest fill
    if max_behaviours < 1:
        raise ValueError(f"row_tokens ({config.row_tokens}) leaves no room for a behaviour after a prompt fill of up to {fill - 1} tokens")
    histories = tokenizer.encode_histories(events, max_history=10**9)
    segments = user_segments(histories, tpb, max_behaviours, fill=fill, seed=config.seed)
    if not segments:
        raise ValueError("the pretraining window holds no behaviours to learn from")
    batches = plan_epochs(segments, config.row_tokens, config.rows_per_batch, config.packing, config.seed, config.epochs)
    total_steps = len(batches)
    run_steps = min(total_steps, config.max_steps) if config.max_steps else total_steps
    item_index = item_index_of(tokenizer)

    if base_model is not None:
        model = base_model
        model.resize_token_embeddings(tokenizer.vocab_size, mean_resizing=True)
    else:
        model = build_model(config.preset, tokenizer.vocab_size, seed=config.seed)
    model.train()
    facts = None
    if config.share_category or config.content_column:
        facts = item_side_facts(tokenizer, items, config.share_category, config.content_column)
    objective = NextItemObjective(model, tokenizer.item_side_ids(), None if facts is None else ItemFactors(facts, model.config.hidden_size))
    if world > 1:
        _shard(objective)
    decay = [p for n, p in objective.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in objective.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(config.warmup_ratio * total_steps)), total_steps)

    settings = {"config": asdict(config), "tokenizer": tokenizer.fingerprint, "segments": len(segments), "world": world}
    step, log = 0, []
    checkpoint = partial / CHECKPOINT_FILE
    if checkpoint.exists():
        state = _load_checkpoint(checkpoint, partial)
        if state["settings"] != settings:
            raise ValueError(
                f"{checkpoint} was written by a run with other settings; remove {partial} to start over"
            )
        _load_states(objective, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, log = state["step"], state["log"]
        if rank == 0 and progress:
            print(f"resuming from step {step} of {run_steps} ({checkpoint})")
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)

    my_rows = slice(rank, None, world)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else nullcontext()
    bar = tqdm(total=run_steps, initial=step, desc="pretraining", unit="step", disable=bars_off(progress) or rank != 0)
    started, tokens_done = time.perf_counter(), 0
    while step < run_steps:
        rows = batches[step] + [[]] * (-len(batches[step]) % world)  # an epoch's last batch may be short: empty rows keep every rank busy
        batch = make_batch(segments, rows, item_index, config.packing, config.row_tokens)
        local = batch.rows(my_rows)
        n_targets = _all_sum(local.n_targets)
        with autocast:
            loss_sum, correct = objective(local)
        # FSDP averages gradients over ranks: scale so the result is the global mean over targets
        (loss_sum * world / max(n_targets, 1.0)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = _all_sum(float(loss_sum.detach())) / max(n_targets, 1.0)
        accuracy = _all_sum(float(correct)) / max(n_targets, 1.0)
        real = _all_sum(local.real_tokens)
        tokens_done += real
        elapsed = time.perf_counter() - started
        log.append(
            {
                "step": step, "loss": loss, "accuracy": accuracy, "real_tokens": int(real), "padded_tokens": int(batch.input_ids.numel()),
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "seconds": elapsed,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_done / max(elapsed, 1e-9):,.0f}")
        if step % config.checkpoint_every == 0 or step == run_steps:
            model_state, optim_state = _full_states(objective, optimizer)
            if rank == 0:
                _atomic_torch_save(
                    {"settings": settings, "step": step, "log": log, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
                    checkpoint,
                )
    bar.close()

    model_state, _ = _full_states(objective, optimizer)
    manifest: dict[str, Any] = {}
    if rank == 0:
        manifest = _write_model_folder(out_dir, partial, tokenizer, config, model_state, log, events, base_manifest, extra_manifest, facts)
    if dist.is_initialized():
        dist.barrier()
    return manifest


def _write_model_folder(out_dir, partial, tokenizer, config, model_state, log, events, base_manifest, extra_manifest, facts=None) -> dict[str, Any]:
    final = LlamaForCausalLM(llama_config(get_preset(config.preset), tokenizer.vocab_size))
    # drop the objective's prefix; the item factors are folded into the plain model's embeddings and head below
    final.load_state_dict({k.removeprefix("model."): v for k, v in model_state.items() if k.startswith("model.")})
    if facts is not None:
        factors = ItemFactors(facts, final.config.hidden_size)
        factors.load_state_dict({k.removeprefix("factors."): v for k, v in model_state.items() if k.startswith("factors.")})
        factors.fold_into(final.model.embed_tokens.weight.data, final.lm_head.weight.data)
    staging = partial / "model"
    if staging.exists():
        shutil.rmtree(staging)
    final.save_pretrained(staging, safe_serialization=True)
    tokenizer.save(staging)
    save_hf_tokenizer(staging, tokenizer.vocab)
    facts = window_facts(events)
    fingerprint = data_fingerprint(facts, tokenizer.fingerprint)
    manifest = {
        "model_version": f"lum-{config.preset}-{tokenizer.config.item_tokenization}-{data_fingerprint(fingerprint, asdict(config))[:10]}",
        "preset": config.preset,
        "item_tokenization": tokenizer.config.item_tokenization,
        "condition_columns": list(tokenizer.config.condition_columns),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": get_preset(config.preset).hidden_size,
        "training_window": facts,
        "data_fingerprint": fingerprint,
        "pretrain_config": asdict(config),
        "steps": len(log),
        "final_loss": log[-1]["loss"] if log else None,
        "continued_from": None if base_manifest is None else base_manifest["model_version"],
        "semantic_ids_report": None if tokenizer.semantic is None else tokenizer.semantic["report"],
        **(extra_manifest or {}),
        "weights_sha256": weights_digest(staging),  # checked wherever the weights are loaded (lum.model.verify_weights)
    }
    write_manifest(staging, manifest)
    write_model_card(staging, manifest, tokenizer)
    (staging / "training_log.json").write_text(json.dumps(log))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    shutil.rmtree(partial)
    return manifest
