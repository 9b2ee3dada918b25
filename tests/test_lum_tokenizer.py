"""The behaviour tokenizer: vocabulary, back-off, histories, persistence, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lum.tokenizer import BOS, UNK_CONDITION, UNK_ITEM, BehaviourTokenizer, TokenizerConfig, TokenizerError, fit_tokenizer

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def frame(rows: list[tuple]) -> pd.DataFrame:
    """(user, item, minute, label, surface, device)"""
    out = pd.DataFrame(rows, columns=["user_id", "item_id", "minute", "label", "surface", "device"])
    out["ts"] = T0 + pd.to_timedelta(out.pop("minute"), unit="min")
    return out


EVENTS = frame(
    [("u1", "a", m, 1, "home", "mobile") for m in range(3)]
    + [("u1", "b", 10 + m, 1, "home", "desktop") for m in range(2)]
    + [("u2", "a", m, 1, "search", "mobile") for m in range(2)]
    + [("u2", "c", 5, 1, "search", "mobile"), ("u2", "z", 6, 0, "cart", "tablet")]
)
ITEMS = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "category": ["x", "x", "y", "y"]})
CONFIG = TokenizerConfig(condition_columns=("surface", "device"), min_item_count=2, min_condition_count=2)


@pytest.fixture(scope="module")
def tokenizer() -> BehaviourTokenizer:
    return fit_tokenizer(EVENTS, CONFIG, ITEMS)


def test_vocabulary(tokenizer):
    assert tokenizer.vocab[:4] == ["[PAD]", "[BOS]", "[UNK_CONDITION]", "[UNK_ITEM]"]
    assert tokenizer.condition_tokens == [
        "C:surface=home|device=desktop",
        "C:surface=home|device=mobile",
        "C:surface=search|device=mobile",
        "C:surface=home",
        "C:surface=search",
    ]
    # a: 5 clicks, b: 2 -> own tokens; c: 1 click -> its category; z: label 0 is not a behaviour
    assert [tokenizer.vocab[i] for i in tokenizer.item_token_ids()] == ["I:a", "I:b"]
    assert [tokenizer.vocab[i] for i in tokenizer.item_side_ids()] == ["CAT:x", "CAT:y", "I:a", "I:b"]


def test_condition_names_are_what_lum_embed_takes(tokenizer):
    assert tokenizer.condition_names() == ["surface=home|device=desktop", "surface=home|device=mobile", "surface=search|device=mobile",
                                           "surface=home", "surface=search"]
    assert tokenizer.condition_names(column="surface") == ["surface=home", "surface=search"]  # single-column ones only
    assert tokenizer.condition_names(column="device") == []


def test_condition_back_off(tokenizer):
    queries = pd.DataFrame({"surface": ["home", "home", "search", "cart", None], "device": ["mobile", "tablet", "tablet", "mobile", "mobile"]})
    tokens = [tokenizer.vocab[i] for i in tokenizer.condition_ids(queries)]
    assert tokens == ["C:surface=home|device=mobile", "C:surface=home", "C:surface=search", "[UNK_CONDITION]", "[UNK_CONDITION]"]


def test_rare_and_new_items_fall_back_to_their_category(tokenizer):
    ids = tokenizer.item_ids(pd.Series(["a", "c", "d", "never-seen"]))[:, 0]
    assert [tokenizer.vocab[i] for i in ids] == ["I:a", "CAT:y", "CAT:y", "[UNK_ITEM]"]
    assert ids[3] == UNK_ITEM


def test_histories_are_condition_item_pairs_in_time_order_truncated_to_the_last_n(tokenizer):
    histories = tokenizer.encode_histories(EVENTS)
    v = tokenizer.token_to_id
    assert histories["u2"].tolist() == [
        BOS,
        v["C:surface=search|device=mobile"], v["I:a"],
        v["C:surface=search|device=mobile"], v["I:a"],
        v["C:surface=search|device=mobile"], v["CAT:y"],
    ]
    short = tokenizer.encode_histories(EVENTS, max_history=2)
    assert short["u1"].tolist() == [BOS, v["C:surface=home|device=desktop"], v["I:b"]] * 1 + [v["C:surface=home|device=desktop"], v["I:b"]]
    everything = fit_tokenizer(EVENTS, TokenizerConfig(("surface", "device"), history_events="all", min_condition_count=1), ITEMS)
    assert len(everything.encode_histories(EVENTS)["u2"]) == 1 + 2 * 4  # the label-0 event counts too


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = BehaviourTokenizer.load(tmp_path, expected_fingerprint=tokenizer.fingerprint)
    assert loaded.vocab == tokenizer.vocab and loaded.config == tokenizer.config
    assert loaded.encode_histories(EVENTS)["u1"].tolist() == tokenizer.encode_histories(EVENTS)["u1"].tolist()


def test_loading_another_tokenizer_fails_clearly(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    with pytest.raises(TokenizerError, match="is not the one the model was trained with"):
        BehaviourTokenizer.load(tmp_path, expected_fingerprint="0123456789abcdef")
    payload = json.loads((tmp_path / "behaviour_tokenizer.json").read_text())
    payload["format_version"] = 99
    (tmp_path / "behaviour_tokenizer.json").write_text(json.dumps(payload))
    with pytest.raises(TokenizerError, match="format version 99 is not the supported version 1"):
        BehaviourTokenizer.load(tmp_path)
    payload["format_version"] = 1
    payload["vocab"].append("I:smuggled")
    (tmp_path / "behaviour_tokenizer.json").write_text(json.dumps(payload))
    with pytest.raises(TokenizerError, match="does not match its recorded fingerprint"):
        BehaviourTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        BehaviourTokenizer.load(tmp_path / "nowhere")


def test_bad_input():
    with pytest.raises(TokenizerError, match="unknown condition column.*weather"):
        fit_tokenizer(EVENTS, TokenizerConfig(("surface", "weather")), ITEMS)
    with pytest.raises(TokenizerError, match="no behaviours in the pretraining window"):
        fit_tokenizer(EVENTS[EVENTS.label == 0], CONFIG, ITEMS)
    with pytest.raises(ValueError, match="item_tokenization\n  Input should be 'id' or 'semantic'"):
        TokenizerConfig(("surface",), item_tokenization="bpe")
    tokenizer = fit_tokenizer(EVENTS, CONFIG, ITEMS)
    with pytest.raises(TokenizerError, match="condition column.*device.*not in the events"):
        tokenizer.condition_ids(pd.DataFrame({"surface": ["home"]}))


def test_unknown_condition_values_map_to_the_unknown_token(tokenizer):
    ids = tokenizer.condition_ids(pd.DataFrame({"surface": ["moon"], "device": ["watch"]}))
    assert ids.tolist() == [UNK_CONDITION]
    assert np.isin(tokenizer.condition_token_ids(), UNK_CONDITION).sum() == 1


def _simulated_items_and_events(tiny_sim):
    events, items = tiny_sim
    return events.to_pandas(), items.to_pandas()


SEMANTIC = TokenizerConfig(
    ("surface", "device", "daypart"),
    item_tokenization="semantic",
    semantic_codebook_size=16,
    categorical_columns=("category",),
    numeric_columns=("price",),
    vector_column="content",
)


def test_semantic_ids_tokenize_every_item_from_content(tiny_sim, tmp_path):
    events, items = _simulated_items_and_events(tiny_sim)
    tokenizer = fit_tokenizer(events, SEMANTIC, items)
    report = tokenizer.semantic["report"]
    assert report["n_items"] == len(items) and 0 <= report["collision_rate"] < 0.5
    assert all(0 < u <= 1 for u in report["usage"])
    codes = tokenizer.item_ids(items["item_id"])
    assert codes.shape == (len(items), 4)
    assert len({tuple(c) for c in codes}) == len(items)  # the tie-break makes every item unique
    assert [tokenizer.vocab[t].split(":")[0] for t in codes[0]] == ["S0", "S1", "S2", "T"]
    history = tokenizer.encode_histories(events)
    first_user = next(iter(history))
    assert len(history[first_user]) % 5 == 1  # [BOS] + 5 tokens per behaviour
    tokenizer.save(tmp_path)
    loaded = BehaviourTokenizer.load(tmp_path, expected_fingerprint=tokenizer.fingerprint)
    assert np.array_equal(loaded.item_ids(items["item_id"]), codes)


def test_new_items_get_codes_from_content_alone(tiny_sim):
    from lum.semantic_tokens import add_items

    events, items = _simulated_items_and_events(tiny_sim)
    old, new = items.iloc[:250], items.iloc[250:]
    tokenizer = fit_tokenizer(events, SEMANTIC, old)
    assert (tokenizer.item_ids(new["item_id"]) == UNK_ITEM).all()
    extended = add_items(tokenizer.semantic, items, tokenizer.token_to_id)
    full = fit_tokenizer(events, SEMANTIC, old)
    full.semantic = extended
    new_codes = full.item_ids(new["item_id"])
    assert not (new_codes == UNK_ITEM).any()
    # an item with the same content as an old one gets the old one's codes (tie-break aside)
    clone = old.iloc[[0]].assign(item_id="clone-of-first")
    with_clone = add_items(tokenizer.semantic, pd.concat([old, clone]), tokenizer.token_to_id)
    assert np.array_equal(with_clone["item_tokens"]["clone-of-first"][:3], tokenizer.semantic["item_tokens"][str(old.item_id.iloc[0])][:3])


def test_semantic_tokenizer_bad_input(tiny_sim):
    events, items = _simulated_items_and_events(tiny_sim)
    with pytest.raises(TokenizerError, match="needs content columns.*--text-column"):
        fit_tokenizer(events, TokenizerConfig(("surface",), item_tokenization="semantic"), items)
    with pytest.raises(TokenizerError, match="items table: .*genre"):
        fit_tokenizer(events, TokenizerConfig(("surface",), item_tokenization="semantic", categorical_columns=("genre",)), items)
    with pytest.raises(TokenizerError, match="needs an items table"):
        fit_tokenizer(events, SEMANTIC, None)
