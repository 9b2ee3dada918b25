"""Presets, packing isolation, learning, resume after a kill, multi-process FSDP, continued pretraining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lum.evaluate import EvalConfig, evaluate_next_item
from lum.model import ModelFolderError, build_model, count_parameters, load_model, read_manifest
from lum.pretrain import PretrainConfig, item_index_of, pretrain
from lum.sequences import make_batch, pack_rows, user_segments
from lum.tokenizer import BOS, BehaviourTokenizer, TokenizerConfig

REPO = Path(__file__).resolve().parents[1]
T0 = pd.Timestamp("2024-01-01", tz="UTC")


def test_7b_preset_has_llama2_7b_shapes():
    model = build_model("7b", 32_000, device="meta")
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (4096, 32, 32, 11008)
    assert 6.5e9 < count_parameters(model) < 7.5e9


def test_unknown_preset():
    with pytest.raises(ModelFolderError, match="unknown model preset 'huge'"):
        build_model("huge", 100)
    with pytest.raises(ValueError, match="unknown model preset 'huge': expected one of tiny, small"):
        PretrainConfig(preset="huge")


def test_best_fit_packing():
    # rows of 10: 6 -> new row A (4 left); 5 -> new row B (5 left); 4 -> A (best fit); 3 -> B; 2 -> B (0 left)
    assert pack_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="does not fit a row of 10 tokens"):
        pack_rows([11], 10)


def test_packing_isolates_users():
    """Changing user A's tokens in a packed row leaves user B's hidden states and loss unchanged,
    and B packed behind A gives what B alone gives."""
    vocab = ["[PAD]", "[BOS]", "[UNK_CONDITION]", "[UNK_ITEM]", "C:s=x", "C:s=y"] + [f"I:{i}" for i in range(20)]
    item_index = np.full(len(vocab), -1)
    item_index[6:] = np.arange(20)
    a = np.array([BOS, 4, 6, 5, 7, 4, 8])
    a_changed = np.array([BOS, 5, 19, 5, 18, 4, 17])
    b = np.array([BOS, 5, 10, 4, 11, 4, 12, 5, 13])
    model = build_model("tiny", len(vocab), seed=0).eval()

    def hidden_and_targets(segments):
        batch = make_batch(segments, [list(range(len(segments)))], item_index, packing=True, row_tokens=32)
        with torch.no_grad():
            hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        return hidden[0], batch.targets[0]

    h1, t1 = hidden_and_targets([a, b])
    h2, t2 = hidden_and_targets([a_changed, b])
    hb, tb = hidden_and_targets([b])
    b1 = slice(len(a), len(a) + len(b))
    assert torch.equal(t1[b1], t2[b1]) and torch.equal(t1[b1], tb[: len(b)])
    assert torch.allclose(h1[b1], h2[b1], atol=1e-6)
    assert torch.allclose(h1[b1], hb[: len(b)], atol=1e-5)
    assert not torch.allclose(h1[: len(a)], h2[: len(a)], atol=1e-3)  # A's own states did change
    head = model.lm_head.weight[6:]
    losses = [torch.nn.functional.cross_entropy(h[b1][t[b1] >= 0] @ head.T, t[b1][t[b1] >= 0]) for h, t in ((h1, t1), (h2, t2))]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_segments_start_with_a_random_fill_of_bos_the_embedding_job_may_use():
    histories = {f"u{i}": np.concatenate([[BOS], np.arange(10, 10 + 2 * (5 + i))]) for i in range(200)}
    segments = user_segments(histories, tokens_per_behaviour=2, max_behaviours=8, fill=32, seed=0)
    again = user_segments(histories, 2, 8, fill=32, seed=0)
    assert len(again) == len(segments) and all(np.array_equal(a, b) for a, b in zip(segments, again))  # deterministic
    fills = []
    for seg in segments:
        bos = int(np.argmax(seg != BOS))  # length of the leading [BOS] run
        assert 1 <= bos <= 32 and len(seg) - bos <= 16 and (seg[bos:] >= 10).all()
        fills.append(bos - 1)
    assert min(fills) == 0 and max(fills) == 31 and len(set(fills)) == 32  # every fill the job may ask is seen
    body = np.concatenate([s[int(np.argmax(s != BOS)):] for s in segments])
    assert len(body) == sum(len(h) - 1 for h in histories.values())  # no behaviour lost
    plain = user_segments(histories, 2, 8)
    assert all(s[0] == BOS and s[1] != BOS for s in plain)  # fill=1: one [BOS], as before


def cyclic_events(n_users: int = 60, length: int = 30, n_items: int = 40, seed: int = 0) -> pd.DataFrame:
    """Deterministic grammar: under condition 'up' the next item is previous + 1, under 'jump' previous + 7."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        item = int(rng.integers(n_items))
        for t in range(length):
            cond = "up" if rng.random() < 0.5 else "jump"
            item = (item + (1 if cond == "up" else 7)) % n_items
            rows.append((f"u{u}", f"i{item}", T0 + pd.Timedelta(minutes=t), 1, cond))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label", "mode"])


@pytest.mark.slow  # trains an LM to convergence
def test_the_model_learns_condition_dependent_transitions(tmp_path):
    events = cyclic_events()
    history = events[events.ts < T0 + pd.Timedelta(minutes=25)]
    test = events[events.ts >= T0 + pd.Timedelta(minutes=25)]
    config = PretrainConfig(preset="tiny", epochs=40, rows_per_batch=4, row_tokens=128, lr=1e-2, checkpoint_every=10_000)
    manifest = pretrain(history, tmp_path / "m", config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    log = json.loads((tmp_path / "m" / "training_log.json").read_text())
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    loaded = load_model(tmp_path / "m")
    tokenizer = BehaviourTokenizer.load(tmp_path / "m", expected_fingerprint=manifest["tokenizer_fingerprint"])
    result = evaluate_next_item(loaded.model, tokenizer, history, test, EvalConfig(k=10, max_users=None, sasrec=False))
    model_hr = result["overall"]["model"]["hr@10"]
    assert model_hr > 0.6  # measured 0.8 (40 items: chance is 0.25)
    assert model_hr > 2 * result["overall"]["popularity"]["hr@10"]
    assert model_hr > 2 * result["overall"]["recent"]["hr@10"]
    assert set(result["per_condition"]) == {"C:mode=up", "C:mode=jump"}


def test_model_folder_is_complete_and_loadable_by_transformers(tiny_lm):
    folder, manifest = tiny_lm
    assert {"config.json", "model.safetensors", "behaviour_tokenizer.json", "tokenizer.json", "lum_manifest.json", "training_log.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not folder.with_name(folder.name + ".partial").exists()
    assert read_manifest(folder) == manifest
    assert manifest["preset"] == "tiny" and manifest["item_tokenization"] == "id"
    assert manifest["condition_columns"] == ["surface", "device", "daypart"]
    assert manifest["training_window"]["events"] > 0 and manifest["data_fingerprint"]
    loaded = load_model(folder)
    assert loaded.model.config.vocab_size == manifest["vocab_size"]


def test_every_model_folder_carries_a_model_card_read_from_its_own_manifest(tiny_lm, tiny_sim):
    from lum.model_card import model_card
    from lum.tokenizer import BehaviourTokenizer, TokenizerConfig

    folder, manifest = tiny_lm
    card = (folder / "README.md").read_text()
    tokenizer = BehaviourTokenizer.load(folder)
    assert card.startswith(f"# Behaviour LM `{manifest['model_version']}`")
    assert "columns `surface`, `device`, `daypart` (in back-off order)" in card
    assert f"{manifest['training_window']['events']:,} events of {manifest['training_window']['users']:,} users" in card
    assert f"fingerprint `{tokenizer.fingerprint}`" in card and f"{len(tokenizer.condition_tokens):,} condition tokens" in card
    assert f"a multiple of {tokenizer.config.prompt_align} tokens" in card and "**id**: one token `I:<item_id>`" in card
    assert f"--conditions {tokenizer.full_condition_tokens()[0][2:]}" in card  # a condition this model knows
    # a semantic model's card describes its codes instead
    semantic = BehaviourTokenizer(TokenizerConfig(("surface",), item_tokenization="semantic", semantic_levels=2, semantic_codebook_size=16,
                                                  categorical_columns=("category",)), tokenizer.vocab, tokenizer.item_category)
    text = model_card(manifest, semantic)
    assert "**semantic**: every item (new ones too) is 2 code tokens `S0:<code> ... S1:<code>` (16 codes a level" in text
    assert "A behaviour is 4 tokens." in text


def _pretrain_script(tmp_path: Path, events: pd.DataFrame, out: Path, config: dict) -> Path:
    data = tmp_path / "events.parquet"
    events.to_parquet(data)
    script = tmp_path / "run_pretrain.py"
    script.write_text(
        "import pandas as pd, sys\n"
        "from lum.pretrain import PretrainConfig, pretrain\n"
        "from lum.tokenizer import TokenizerConfig\n"
        f"events = pd.read_parquet({str(data)!r})\n"
        f"pretrain(events, {str(out)!r}, PretrainConfig(**{config!r}), TokenizerConfig(('mode',), min_condition_count=1), progress=False)\n"
    )
    return script


@pytest.mark.e2e  # pretraining subprocesses, one killed
def test_a_killed_run_resumes_from_its_checkpoint_and_reaches_the_same_result(tmp_path):
    events = cyclic_events(n_users=40)
    config = {"preset": "tiny", "epochs": 30, "rows_per_batch": 2, "row_tokens": 128, "checkpoint_every": 10, "threads": 1}
    straight = tmp_path / "straight"
    pretrain(events, straight, PretrainConfig(**config), TokenizerConfig(("mode",), min_condition_count=1), progress=False)

    resumed = tmp_path / "resumed"
    script = _pretrain_script(tmp_path, events, resumed, config)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    checkpoint = tmp_path / "resumed.partial" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not resumed.exists(), "the run was not interrupted mid-way"
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]  # plain tensors and values: no unpickling needed
    total = json.loads((straight / "training_log.json").read_text())[-1]["step"]
    assert 0 < step_at_kill < total

    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log_a = json.loads((straight / "training_log.json").read_text())
    log_b = json.loads((resumed / "training_log.json").read_text())
    assert [round(x["loss"], 5) for x in log_a] == [round(x["loss"], 5) for x in log_b]


class _Payload:
    """What an attacker would place as checkpoint.pt: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_partial_folder_is_refused_and_never_runs(tmp_path):
    out = tmp_path / "model"
    partial = tmp_path / "model.partial"
    partial.mkdir()
    marker = tmp_path / "payload-ran"
    torch.save({"settings": _Payload(marker), "step": 1}, partial / "checkpoint.pt")
    config = PretrainConfig(preset="tiny", epochs=1, rows_per_batch=2, row_tokens=128, threads=1)
    with pytest.raises(ValueError, match="checkpoint.pt is not a resume checkpoint this code wrote.*remove"):
        pretrain(cyclic_events(n_users=10), out, config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    assert not marker.exists() and not out.exists()
    (partial / "checkpoint.pt").write_bytes(b"garbage")  # a damaged file: the same clear error
    with pytest.raises(ValueError, match="not a resume checkpoint"):
        pretrain(cyclic_events(n_users=10), out, config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)


@pytest.mark.e2e  # two torch.distributed processes
def test_two_processes_with_fsdp_follow_the_one_process_loss_curve(tmp_path):
    events = cyclic_events(n_users=40)
    config = {"preset": "tiny", "epochs": 4, "rows_per_batch": 4, "row_tokens": 128, "checkpoint_every": 1000, "threads": 1}
    one = tmp_path / "one"
    pretrain(events, one, PretrainConfig(**config), TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    two = tmp_path / "two"
    script = _pretrain_script(tmp_path, events, two, config)
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port", str(_free_port()), str(script)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    curve_one = [x["loss"] for x in json.loads((one / "training_log.json").read_text())]
    curve_two = [x["loss"] for x in json.loads((two / "training_log.json").read_text())]
    assert len(curve_one) == len(curve_two) >= 10
    assert np.max(np.abs(np.array(curve_one) - np.array(curve_two))) < 1e-3
    assert read_manifest(two)["pretrain_config"] == read_manifest(one)["pretrain_config"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_continued_pretraining_extends_the_vocabulary(tmp_path):
    events = cyclic_events(n_users=30, n_items=30)
    first = events[events.ts < T0 + pd.Timedelta(minutes=15)]
    later = cyclic_events(n_users=30, n_items=50, seed=1)  # items i30..i49 are new
    later["ts"] = later["ts"] + pd.Timedelta(days=1)
    config = PretrainConfig(preset="tiny", epochs=2, rows_per_batch=4, row_tokens=128)
    base = pretrain(first, tmp_path / "base", config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    continued = pretrain(later, tmp_path / "cpt", config, init_from=tmp_path / "base", progress=False)
    old = BehaviourTokenizer.load(tmp_path / "base")
    new = BehaviourTokenizer.load(tmp_path / "cpt", expected_fingerprint=continued["tokenizer_fingerprint"])
    assert new.vocab[: old.vocab_size] == old.vocab  # every old id kept
    assert "I:i45" in new.token_to_id and "I:i45" not in old.token_to_id
    assert continued["vocab_size"] == new.vocab_size > base["vocab_size"]
    assert continued["continued_from"] == base["model_version"]
    # old rows start from the trained model: the first continued step is better than a fresh model's first step
    fresh = pretrain(later, tmp_path / "fresh", config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    first_loss = lambda d: json.loads((tmp_path / d / "training_log.json").read_text())[0]["loss"]  # noqa: E731
    assert fresh["steps"] == continued["steps"]
    assert first_loss("cpt") < first_loss("fresh")


def test_bad_input(tmp_path):
    config = PretrainConfig(preset="tiny")
    empty = cyclic_events().iloc[:0]
    with pytest.raises(ValueError, match="pretraining window holds no events"):
        pretrain(empty, tmp_path / "m", config, TokenizerConfig(("mode",)), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already holds a model"):
        pretrain(cyclic_events(), tmp_path / "exists", config, TokenizerConfig(("mode",)), progress=False)
    with pytest.raises(ValueError, match="unknown condition column"):
        pretrain(cyclic_events(), tmp_path / "m2", config, TokenizerConfig(("weather",)), progress=False)


def test_semantic_mode_predicts_every_code_of_the_next_item(tmp_path, tiny_sim):
    events, items = tiny_sim
    config = TokenizerConfig(
        ("surface", "device", "daypart"), item_tokenization="semantic", semantic_codebook_size=16,
        categorical_columns=("category",), vector_column="content",
    )
    manifest = pretrain(
        events.to_pandas(), tmp_path / "sem", PretrainConfig(preset="tiny", epochs=3, rows_per_batch=4, row_tokens=512), config, items.to_pandas(),
        progress=False,
    )
    assert manifest["item_tokenization"] == "semantic"
    assert manifest["semantic_ids_report"]["n_items"] == items.num_rows
    tokenizer = BehaviourTokenizer.load(tmp_path / "sem", expected_fingerprint=manifest["tokenizer_fingerprint"])
    segment = tokenizer.encode_histories(events.to_pandas(), max_history=3)["u0"]
    batch = make_batch([segment], [[0]], item_index_of(tokenizer), packing=True, row_tokens=32)
    # 3 behaviours x (condition + 3 codes) positions carry a loss; the tie-break token is the last target
    assert batch.n_targets == 12
    log = json.loads((tmp_path / "sem" / "training_log.json").read_text())
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.slow  # trains an LM to convergence
def test_a_semantic_id_model_learns_condition_dependent_transitions_and_generates_them(tmp_path):
    """The cyclic world with content codes: the beam search must find the next item of each condition."""
    events = cyclic_events()
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_id": [f"i{n}" for n in range(40)], "content": list(rng.normal(size=(40, 8)).astype(np.float32))})
    history = events[events.ts < T0 + pd.Timedelta(minutes=25)]
    test = events[events.ts >= T0 + pd.Timedelta(minutes=25)]
    config = PretrainConfig(preset="tiny", epochs=40, rows_per_batch=4, row_tokens=256, lr=1e-2, checkpoint_every=10_000)
    tokenizer_config = TokenizerConfig(("mode",), min_condition_count=1, item_tokenization="semantic", semantic_levels=2,
                                       semantic_codebook_size=6, vector_column="content")
    pretrain(history, tmp_path / "m", config, tokenizer_config, items, progress=False)
    tokenizer = BehaviourTokenizer.load(tmp_path / "m")
    result = evaluate_next_item(load_model(tmp_path / "m").model, tokenizer, history, test, EvalConfig(k=10, max_users=None, sasrec=False))
    model_hr = result["overall"]["model"]["hr@10"]
    assert result["target_not_generable"] == 0.0
    assert model_hr > 0.6  # measured 1.0 (40 items: chance is 0.25)
    assert model_hr > 2 * result["overall"]["popularity"]["hr@10"]


def test_bf16_autocast_trains(tmp_path):
    config = PretrainConfig(preset="tiny", epochs=3, rows_per_batch=4, row_tokens=128, bf16=True)
    pretrain(cyclic_events(n_users=20), tmp_path / "bf16", config, TokenizerConfig(("mode",), min_condition_count=1), progress=False)
    log = json.loads((tmp_path / "bf16" / "training_log.json").read_text())
    assert all(np.isfinite(x["loss"]) for x in log) and log[-1]["loss"] < log[0]["loss"]
    assert load_model(tmp_path / "bf16").model.dtype == torch.float32  # weights are kept in float32


def test_item_factors_fold_into_a_plain_model_that_computes_the_same_loss(tiny_sim):
    """The saved model is a plain Llama: folding the factors into its embeddings and head changes nothing it computes."""
    from lum.item_factors import ItemFactors, item_side_facts
    from lum.pretrain import NextItemObjective
    from lum.tokenizer import fit_tokenizer

    events, items = tiny_sim
    events, items = events.to_pandas(), items.to_pandas()
    tokenizer = fit_tokenizer(events, TokenizerConfig(("surface", "device", "daypart"), min_item_count=3), items)
    facts = item_side_facts(tokenizer, items, use_category=True, content_column="content")
    item_tokens = [i for i, t in enumerate(tokenizer.vocab) if t.startswith("I:")]
    assert (facts.token_category[item_tokens] >= 0).all() and (facts.token_category[:4] == -1).all()
    assert facts.content.shape == (tokenizer.vocab_size, 8) and not facts.content[:4].any()
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer.vocab_size, seed=0)
    factors = ItemFactors(facts, model.config.hidden_size)
    with torch.no_grad():  # non-zero factors (training starts them at zero)
        for p in factors.parameters():
            p.normal_(0.0, 0.05)
    segments = user_segments(tokenizer.encode_histories(events, max_history=20), 2, 20)
    batch = make_batch(segments, [[0, 1, 2]], item_index_of(tokenizer), packing=True, row_tokens=512)
    with torch.no_grad():
        factored, _ = NextItemObjective(model, tokenizer.item_side_ids(), factors)(batch)
        plain_before, _ = NextItemObjective(model, tokenizer.item_side_ids())(batch)
        factors.fold_into(model.model.embed_tokens.weight.data, model.lm_head.weight.data)
        folded, _ = NextItemObjective(model, tokenizer.item_side_ids())(batch)
    assert abs(float(plain_before) - float(factored)) > 1e-3  # the factors matter...
    assert float(folded) == pytest.approx(float(factored), rel=1e-5)  # ...and the folded plain model computes the same


def test_item_factors_make_items_of_a_category_alike_and_fail_clearly(tmp_path, tiny_sim):
    events, items = tiny_sim
    events, items = events.to_pandas(), items.to_pandas()
    tok = TokenizerConfig(("surface", "device", "daypart"), min_item_count=2)
    config = dict(preset="tiny", epochs=2, rows_per_batch=4, row_tokens=512, checkpoint_every=10_000)

    def same_minus_other_category_cosine(folder: Path) -> float:
        tokenizer = BehaviourTokenizer.load(folder)
        head = load_file(folder / "model.safetensors")["lm_head.weight"]
        ids = [i for i, t in enumerate(tokenizer.vocab) if t.startswith("I:")]
        category = np.array([tokenizer.item_category[tokenizer.vocab[i][2:]] for i in ids])
        rows = torch.nn.functional.normalize(head[ids], dim=1)
        cos = (rows @ rows.T).numpy()
        same = category[:, None] == category[None, :]
        off = ~np.eye(len(ids), dtype=bool)
        return float(cos[same & off].mean() - cos[~same].mean())

    plain = pretrain(events, tmp_path / "plain", PretrainConfig(**config), tok, items, progress=False)
    shared = pretrain(events, tmp_path / "shared", PretrainConfig(**config, share_category=True, content_column="content"), tok, items, progress=False)
    assert shared["pretrain_config"]["share_category"] and shared["pretrain_config"]["content_column"] == "content"
    assert plain["model_version"] != shared["model_version"]
    assert same_minus_other_category_cosine(tmp_path / "shared") > same_minus_other_category_cosine(tmp_path / "plain") + 0.05
    assert load_model(tmp_path / "shared").model.config.vocab_size == BehaviourTokenizer.load(tmp_path / "shared").vocab_size
    with pytest.raises(ValueError, match="no content column 'blurb'"):
        pretrain(events, tmp_path / "bad", PretrainConfig(**config, content_column="blurb"), tok, items, progress=False)
    semantic = TokenizerConfig(("surface",), item_tokenization="semantic", semantic_codebook_size=16, vector_column="content")
    with pytest.raises(ValueError, match="need the id item tokenization"):
        pretrain(events, tmp_path / "bad2", PretrainConfig(**config, share_category=True), semantic, items, progress=False)
