"""Every setting of the behaviour LM, in one light module: presets, tokenizer, pretraining, evaluation, embedding.

The CLI builds its options from these dataclasses and a run config's `lm:` and `embed:` sections are made of them
(see contracts/settings.py), so this is the one place a default of the LM side is defined. Kept free of torch and
transformers so that reading a config or `lum --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contracts.settings import Field, config_class


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 4096
    rope_theta: float = 10_000.0


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(64, 2, 2, 2, 128, max_positions=2048),
    "small": ModelPreset(256, 4, 4, 4, 688, max_positions=2048),
    "base": ModelPreset(512, 8, 8, 8, 1376),
    "1b": ModelPreset(2048, 22, 32, 4, 5632),
    "7b": ModelPreset(4096, 32, 32, 32, 11008),
}


@config_class
class PretrainConfig:
    """How the behaviour LM is pretrained (the model size comes from `preset`, see lum/model.py)."""

    preset: str = Field("tiny", description="Model size: a preset of lum/model.py (tiny, small, base, 1b, 7b).")
    epochs: int = Field(10, ge=1, description="Passes over the pretraining window.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (the schedule still spans all epochs).")
    row_tokens: int = Field(512, ge=8, description="Tokens per (packed) training row; also the longest segment.")
    rows_per_batch: int = Field(8, ge=1, description="Rows per optimizer step (split across processes).")
    packing: bool = Field(True, description="Pack several users per row (attention isolated per user).")
    # le=1: an Adam step moves each weight by about lr; a learning rate over 1 is a typo (1e6 for 1e-6), never a setting
    lr: float = Field(3e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a share of the peak (cosine decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming up.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    bf16: bool = Field(False, description="bf16 autocast.")
    seed: int = Field(0, description="Random seed (data order, initialisation).")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (the resume point).")
    threads: int | None = Field(None, ge=1, description="Torch intra-op threads (default: the CPUs this process may use, or OMP_NUM_THREADS).")
    # item factors (lum/item_factors.py, id tokenization only), folded into the saved plain Llama
    share_category: bool = Field(False, description="id: a category component shared by the item tokens of each category.")
    content_column: str | None = Field(None, description="id: add a learned map of this items-table vector column to every item token.")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset '{self.preset}': expected one of {', '.join(PRESETS)}")


@config_class
class TokenizerConfig:
    """How events become tokens: which conditions, which items get their own token, how items are coded."""

    condition_columns: tuple[str, ...] = Field((), description="Condition columns, in back-off order (empty: every condition column of the log).")
    item_tokenization: Literal["id", "semantic"] = Field("id", description="id: a token per frequent item; semantic: codes from the items' content.")
    min_item_count: int = Field(5, ge=1, description="Items seen fewer times share their category's token.")
    min_condition_count: int = Field(5, ge=1, description="Rarer condition combinations back off to coarser ones.")
    max_history: int = Field(100, ge=1, description="Behaviours per training segment and per query (the last ones).")
    history_events: Literal["auto", "positive", "all"] = Field(
        "auto", description="Which events are behaviours: positive (clicks), all, or auto (all for a log of ratings such as MovieLens, else positive).")
    category_column: str = Field("category", description="The items-table column whose token rare and new items fall back to.")
    semantic_levels: int = Field(3, ge=1, le=8, description="semantic: code levels per item (each is a token).")
    semantic_codebook_size: int = Field(256, ge=2, description="semantic: codes per level.")
    text_columns: tuple[str, ...] = Field((), description="semantic: item text columns.")
    categorical_columns: tuple[str, ...] = Field((), description="semantic: item categorical columns.")
    numeric_columns: tuple[str, ...] = Field((), description="semantic: item numeric columns.")
    vector_column: str | None = Field(None, description="semantic: an items-table column holding a content vector.")
    seed: int = Field(0, description="Random seed of the semantic codebooks.")
    # Queries are left-filled with [BOS] to a multiple of this, so vLLM's prefix cache (whole 32-token blocks on CPU)
    # holds a user's entire history; 1 turns it off (and is what a tokenizer saved before the option means).
    prompt_align: int = Field(32, ge=1, description="Queries are left-filled with [BOS] to a multiple of this many tokens.")

    @property
    def tokens_per_item(self) -> int:
        return 1 if self.item_tokenization == "id" else self.semantic_levels + 1


@config_class
class SasRecConfig:
    """The SASRec-style baseline of the next-item evaluation (lum/sasrec.py)."""

    hidden_size: int = Field(64, ge=8, description="Item embedding and model width.")
    layers: int = Field(2, ge=1, description="Transformer blocks.")
    heads: int = Field(2, ge=1, description="Attention heads.")
    max_len: int = Field(50, ge=2, description="Items per user trained on and per query: the last ones, as SASRec does.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings and in the blocks.")
    epochs: int = Field(100, ge=1, description="At most this many passes over the training sequences (validation stops it earlier).")
    patience: int = Field(3, ge=0, description="Stop after this many epochs without a better validation NDCG@10.")
    batch_size: int = Field(64, ge=1, description="Segments per step.")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate.")
    seed: int = Field(0, description="Initialisation and data order.")


@config_class
class EvalConfig:
    """Next-item evaluation of the LM on the test window: the model retrieves, the target is looked up in its list."""

    k: int = Field(10, ge=1, description="Cut-off of HR@k and NDCG@k.")
    recall_k: int = Field(50, ge=1, description="Cut-off of Recall@k (one target per user: the hit rate at this depth).")
    beam: int = Field(20, ge=1, description="Beam width of the semantic-id search (see lum/retrieve.py).")
    engine: Literal["torch", "vllm"] = Field("torch", description="Retrieval engine of the model's lists.")
    # off by default: on a large window its training costs more than the rest of the evaluation (minutes on 2 cores)
    sasrec: bool = Field(False, description="Also train and score the SASRec-style baseline on the LM's pretraining window.")
    sasrec_model: SasRecConfig = Field(default_factory=SasRecConfig, description="The SASRec-style baseline's settings.")
    max_users: int | None = Field(2000, ge=0, description="A seeded sample of test users, for speed (0 or None: all).")
    batch_size: int = Field(64, ge=1, description="Users per search batch.")
    seed: int = Field(0, description="Seed of the user sample.")
    # the prompt's last token must not hold the answer: on MovieLens the target's own condition token is its
    # feedback level, derived from the rating being predicted (alone it moved HR@10 from 0.0923 to 0.1145)
    query: str = Field(
        "request", description="The prompt's condition token: request (the target's request-time columns; each after-event "
        "column at its most frequent value in the history), target (the target's own token, which can reveal the answer), "
        "or a fixed condition col=value[|col=value].")
    target_extra: bool = Field(True, description="Also report the model under the target's own condition token, labelled as such "
                               "(only when it differs from the query).")


@config_class
class VllmSettings:
    """vLLM engine knobs; the defaults suit the 2-core CPU machine (see ../shared/STACK.md and benchmarks/)."""

    dtype: str = Field("auto", description="vLLM compute dtype: auto = bfloat16 on GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32.")
    # prefix caching shares whole blocks; vLLM 0.32 on CPU takes multiples of 32 only
    block_size: int = Field(32, ge=1, description="vLLM KV block size (prefix caching shares whole blocks).")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM CPU KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE, reserved up front).")
    max_num_batched_tokens: int = Field(8192, ge=1, description="vLLM max tokens per scheduler step.")
    enable_prefix_caching: bool = Field(True, description="vLLM prefix caching (off only for comparison).")
    # None: computed where the job runs (a fixed "0-1" was this machine's cores, wrong on any other)
    cpu_threads_bind: str | None = Field(None, description="vLLM CPU thread binding (VLLM_CPU_OMP_THREADS_BIND), e.g. 0-3; default: the CPUs this "
                                         "process may use (affinity, cgroup CPU quota); `auto`: vLLM's own choice.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs).")


@config_class
class EmbedJobConfig:
    """How users are embedded: which query conditions, which engine, what is stored."""

    conditions: str = Field("all", description="`all` or comma-separated condition names, e.g. surface=home|device=mobile,request.")
    engine: Literal["vllm", "torch"] = Field("vllm", description="Embedding engine: vLLM (the production path) or the torch group-query engine.")
    max_history: int | None = Field(None, ge=1, description="Behaviours per prompt (default: the tokenizer's max_history).")
    window_stride: int = Field(16, ge=1, description="Rolling: the history window moves in steps of this many behaviours.")
    shards: int = Field(8, ge=1, description="Output shards by user hash (the unit of resume).")
    output_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Precision of the stored vectors (16-bit ones are rounded, stored as float32 that compresses to about half).")
    dim: int | None = Field(None, ge=1, description="Reduce to this many dimensions (PCA fitted on a sample).")
    pca_sample: int = Field(20_000, ge=1, description="Users sampled to fit the PCA.")
    groups_per_call: int = Field(256, ge=1, description="Query groups handed to the engine at once (progress granularity).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM engine settings.")


@config_class
class RetrieveJobConfig:
    """How candidates are generated: which query conditions, which engine, how wide the search, how many kept."""

    conditions: str = Field("all", description="`all` or comma-separated condition names, e.g. surface=home|device=mobile,request.")
    engine: Literal["vllm", "torch"] = Field("vllm", description="Retrieval engine: vLLM (the production path) or the torch reference.")
    top: int = Field(100, ge=1, description="Candidates kept per (user, condition).")
    beam: int = Field(20, ge=1, description="Prefixes kept at the inner code levels of a semantic-id search (id models: unused).")
    max_history: int | None = Field(None, ge=1, description="Behaviours per prompt (default: the tokenizer's max_history).")
    window_stride: int = Field(16, ge=1, description="Rolling: the history window moves in steps of this many behaviours.")
    shards: int = Field(8, ge=1, description="Output shards by user hash (the unit of resume).")
    groups_per_call: int = Field(64, ge=1, description="Query groups searched at once (progress granularity).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM engine settings.")
