"""pipelines.serve's request contract without a ranker or a store (tests/test_serve.py serves the tiny run, e2e): what a
/rank body may hold, the context types a ranker's vocabularies allow, the body limit, the rankers `lum serve` picks."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from contracts.names import MAX_ID_BYTES
from pipelines.serve import BodyLimit, RankRequest, ServeError, context_kinds, context_problems, default_protocol_key


def test_a_rank_request_refuses_unknown_fields_empty_candidates_and_ids_over_the_imports_limit():
    ok = RankRequest(user_id="u1", item_ids=["i1", "i2"], context={"surface": "home", "hour": 9})
    assert ok.request_time is None and ok.return_inputs is False
    with pytest.raises(ValidationError, match="request_tme"):  # a misspelt field is an error, never ignored
        RankRequest(user_id="u1", item_ids=["i1"], request_tme="2025-01-01T00:00:00Z")
    with pytest.raises(ValidationError, match="item_ids"):
        RankRequest(user_id="u1", item_ids=[])
    assert RankRequest(user_id="\u00e9" * (MAX_ID_BYTES // 2), item_ids=["i"]).user_id  # 1,024 bytes: allowed
    with pytest.raises(ValidationError, match=f"an id is at most {MAX_ID_BYTES:,} UTF-8 bytes"):
        RankRequest(user_id="\u00e9" * (MAX_ID_BYTES // 2 + 1), item_ids=["i"])  # 1,026 bytes in 513 characters


def test_context_kinds_follow_the_training_vocabularies_and_a_wrong_type_is_named():
    vocabularies = {"hour": ["0", "9", "23"], "surface": ["home", "search", "cart", "item_detail", "feed"]}
    kinds = context_kinds(vocabularies, ["hour", "surface", "device"])
    assert kinds == {"hour": "integer", "surface": "text", "device": "any"}
    assert context_problems({"hour": 9, "surface": "home", "device": 3.5}, kinds, vocabularies) == []
    assert context_problems({"hour": "9", "surface": None}, kinds, vocabularies) == []  # an integer string; null: the missing value
    problems = context_problems({"hour": "nine", "surface": 4, "device": float("nan")}, kinds, vocabularies)
    assert problems == ['context.hour: expected an integer or null, got "nine" (training values: 0, 9, 23)',
                        "context.surface: expected text or null, got 4 (training values: home, search, cart, item_detail, ...)",
                        "context.device: expected a finite value or null, got nan"]
    assert context_problems({"hour": True}, kinds, vocabularies) == ["context.hour: expected an integer or null, got true (training values: 0, 9, 23)"]


def test_default_protocol_is_the_runs_first_split_and_a_folder_without_a_run_says_what_to_pass(tmp_path):
    (tmp_path / "run_state.json").write_text(json.dumps({"config": {"protocols": [{"split": "per-user"}, {"split": "global"}]}}))
    assert default_protocol_key(tmp_path) == "per-user"
    with pytest.raises(ServeError, match="has no run_state.json .* pass --protocol"):
        default_protocol_key(tmp_path / "nothing")


def _call(body: bytes, declared: bool, chunk: int = 1 << 30) -> tuple[int, bytes, list[bytes]]:
    """Send `body` (in chunks) through BodyLimit(app, 100); the status and body answered, and what the app read."""
    sent, read = [], []
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    headers = [(b"content-length", str(len(body)).encode())] if declared else []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):
        more = True
        while more:
            message = await receive()
            read.append(message["body"])
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    asyncio.run(BodyLimit(inner, max_bytes=100)({"type": "http", "headers": headers}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), read


def test_a_body_over_the_limit_is_refused_413_by_its_length_or_while_it_streams_in():
    assert _call(b"x" * 100, declared=True)[:2] == (200, b"ok")
    status, body, read = _call(b"x" * 101, declared=True)
    assert status == 413 and json.loads(body) == {"detail": "the request body is over 100 bytes"} and read == []  # never read
    status, body, read = _call(b"x" * 160, declared=False, chunk=40)  # chunked: refused at the chunk that crosses 100
    assert status == 413 and b"ok" not in body and len(read) == 2
