"""The model card (`README.md`) written into every saved LM folder: what a user of the folder needs to query it.

It states the tokenization, the conditions the model knows, the training window and settings, and how to build a
query by hand (token ids, vLLM, `lum embed`). Everything in it is read from the folder's own manifest and
tokenizer, so the card never disagrees with the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lum.tokenizer import BehaviourTokenizer

CARD_FILE = "README.md"
_LISTED_CONDITIONS = 20  # a card lists this many condition tokens; the tokenizer file holds them all


def model_card(manifest: dict[str, Any], tokenizer: BehaviourTokenizer) -> str:
    """The Markdown text of the card for a model folder's manifest and tokenizer."""
    config = tokenizer.config
    window = manifest.get("training_window") or {}
    conditions = [t[2:] for t in tokenizer.condition_tokens]
    full = [t[2:] for t in tokenizer.full_condition_tokens()]
    item_side = len(tokenizer.item_side_ids())
    if config.item_tokenization == "id":
        items = (f"**id**: one token `I:<item_id>` per item seen at least {config.min_item_count} times in the window; rarer and new "
                 f"items fall back to their category's token `CAT:<{config.category_column}>`, else `[UNK_ITEM]`. A behaviour is 2 tokens.")
    else:
        content = ", ".join([*config.categorical_columns, *config.text_columns, *config.numeric_columns,
                             *([config.vector_column] if config.vector_column else [])])
        items = (f"**semantic**: every item (new ones too) is {config.semantic_levels} code tokens `S0:<code> ... S{config.semantic_levels - 1}:<code>` "
                 f"({config.semantic_codebook_size} codes a level, learned from the items' {content}) plus a tie-break `T:<k>`. "
                 f"A behaviour is {1 + config.tokens_per_item} tokens.")
    listed = ", ".join(f"`{c}`" for c in conditions[:_LISTED_CONDITIONS]) + (
        f", ... ({len(conditions)} in all)" if len(conditions) > _LISTED_CONDITIONS else ""
    )
    settings = json.dumps(manifest.get("pretrain_config", {}), sort_keys=True)
    example = full[0] if full else "surface=home"
    return f"""# Behaviour LM `{manifest['model_version']}`

A causal transformer (Llama architecture, preset `{manifest.get('preset')}`, hidden size {manifest.get('hidden_size')}, vocabulary
{tokenizer.vocab_size:,}) pretrained on users' behaviour sequences by next-condition-item prediction: at every condition
token it predicts the item that follows. Query it with a user's history and a condition token; the last token's
hidden state is "what this user wants under that condition".

## Tokenization
- Vocabulary: special tokens `[PAD] [BOS] [UNK_CONDITION] [UNK_ITEM]` (ids 0-3), {len(conditions):,} condition tokens, {item_side:,} item-side tokens.
- Items: {items}
- Conditions: columns `{'`, `'.join(config.condition_columns)}` (in back-off order). A combination seen fewer than
  {config.min_condition_count} times backs off to its first columns, else `[UNK_CONDITION]`. Known: {listed}.
- Behaviours: {'every event' if config.history_events == 'all' else 'events with label 1'}; a history keeps the last {config.max_history}.
- Tokenizer: `behaviour_tokenizer.json`, fingerprint `{tokenizer.fingerprint}` (the manifest records it; loading checks it).

## Training
- Window: {window.get('events', '?'):,} events of {window.get('users', '?'):,} users, {window.get('ts_min')} to {window.get('ts_max')} (only these were seen).
- Steps: {manifest.get('steps')}, final loss {manifest.get('final_loss')}; continued from: {manifest.get('continued_from') or 'none'}.
- Settings (`lum.pretrain.PretrainConfig`): `{settings}`

## How to build a query
1. Take the user's behaviours strictly before the as-of time, oldest first, the last {config.max_history}.
2. Tokens: `[BOS] c_1 i_1 c_2 i_2 ... c_n i_n q`, where `c_k` is the condition token of behaviour k, `i_k` its item
   token(s) and `q` the query condition token (e.g. `C:{example}`). Left-fill with extra `[BOS]` so that everything
   before `q` is a multiple of {config.prompt_align} tokens (whole prefix-cache blocks).
3. The embedding is the hidden state at `q` after the final norm (vLLM: `runner="pooling"`, `convert="embed"`,
   `PoolerConfig(pooling_type="LAST", use_activation=False)`, prompts as `TokensPrompt(prompt_token_ids=...)`;
   transformers: `hidden_states[-1][:, -1]`). Several conditions of one user share the history prefix.

In Python, `lum.embed.build_queries(BehaviourTokenizer.load(folder), events, as_of, conditions, max_history, stride, align)`
builds these prompts; from the command line:

    lum embed --model {Path('THIS_FOLDER')} --events events.parquet --as-of 2025-01-31 --conditions {example} --out embeddings/
"""


def write_model_card(folder: Path, manifest: dict[str, Any], tokenizer: BehaviourTokenizer) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(manifest, tokenizer))
    return path
