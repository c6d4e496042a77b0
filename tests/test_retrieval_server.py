"""The /retrieve server in-process: original JSON shapes, 4xx validation, micro-batching."""
import asyncio
import json
import logging
import threading
import time

import httpx
import pytest

from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.server import create_app

ROWS = [
    {"id": "d0", "contents": '"Cats"\ncat cat dog'},
    {"id": "d1", "title": "Dogs", "text": "dog bird"},
    {"id": "d2", "contents": '"Fish"\nfish'},
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    build_bm25_index(tmp / "c.jsonl", tmp / "index", show_progress=False)
    return Bm25Retriever.load(tmp / "index", n_threads=1)


class Recording:
    """Wraps a retriever; records each search call, optionally slow, fails on the query 'boom'."""

    def __init__(self, inner, delay=0.0):
        self.inner, self.delay, self.calls = inner, delay, []
        self.lock = threading.Lock()

    def search(self, queries, topk):
        with self.lock:
            self.calls.append((list(queries), topk))
        time.sleep(self.delay)
        if "boom" in queries:
            raise RuntimeError("index on fire")
        return self.inner.search(queries, topk)


def post_all(app, bodies):
    """POST every body concurrently to the app; returns the responses in order."""

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(client.post("/retrieve", content=b if isinstance(b, bytes) else json.dumps(b)) for b in bodies)
            )

    return asyncio.run(run())


def test_round_trip_original_json_shapes(retriever):
    app = create_app(retriever, default_topk=2)
    with_scores, without, default_topk, empty = post_all(
        app,
        [
            {"queries": ["dogs", "cats"], "topk": 3, "return_scores": True},
            {"queries": ["dogs"], "topk": 1, "return_scores": False},
            {"queries": ["dogs"]},  # topk null → server default; return_scores defaults to false
            {"queries": [], "topk": 3},
        ],
    )
    dogs = retriever.search(["dogs"], 3)[0]
    assert with_scores.status_code == 200
    assert with_scores.json() == {
        "result": [
            [{"document": {"id": "d1", "contents": '"Dogs"\ndog bird'}, "score": dogs[0].score},
             {"document": {"id": "d0", "contents": '"Cats"\ncat cat dog'}, "score": dogs[1].score}],
            [{"document": {"id": "d0", "contents": '"Cats"\ncat cat dog'}, "score": retriever.search(["cats"], 1)[0][0].score}],
        ]
    }  # fmt: skip
    assert without.json() == {"result": [[{"id": "d1", "contents": '"Dogs"\ndog bird'}]]}
    assert default_topk.json() == {
        "result": [[{"id": "d1", "contents": '"Dogs"\ndog bird'}, {"id": "d0", "contents": '"Cats"\ncat cat dog'}]]
    }
    assert empty.json() == {"result": []}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 422, "must be a JSON object"),
        ({"topk": 3}, 422, "'queries' must be a list of strings"),
        ({"queries": "dogs"}, 422, "'queries' must be a list of strings"),
        ({"queries": ["ok", 5]}, 422, "'queries' must be a list of strings"),
        ({"queries": ["q"] * 5}, 422, "holds 5 queries; at most 4"),
        ({"queries": ["q"], "topk": 0}, 422, "between 1 and 10, got 0"),
        ({"queries": ["q"], "topk": 11}, 422, "between 1 and 10, got 11"),
        ({"queries": ["q"], "topk": "3"}, 422, "'topk' must be an integer or null"),
        ({"queries": ["q"], "topk": True}, 422, "'topk' must be an integer or null"),
        ({"queries": ["q"], "return_scores": "yes"}, 422, "'return_scores' must be true or false"),
        ({"queries": ["q"], "top_k": 3}, 422, "unknown field(s) ['top_k']"),
    ],
)
def test_bad_requests_get_4xx_and_server_keeps_serving(retriever, body, status, message):
    app = create_app(retriever, max_queries=4, max_query_chars=32, max_topk=10)
    bad, good = post_all(app, [body, {"queries": ["fish"], "topk": 1}])
    assert bad.status_code == status
    assert message in bad.json()["detail"]
    assert good.status_code == 200 and good.json()["result"][0][0]["id"] == "d2"


def test_concurrent_requests_are_batched(retriever):
    recording = Recording(retriever, delay=0.05)
    app = create_app(recording)
    queries = ["cats", "dogs", "fish", "bird", "cat dog", "dog fish", "zebra", "fish bird"]
    bodies = [{"queries": [q], "topk": 1 + i % 3, "return_scores": True} for i, q in enumerate(queries)]
    responses = post_all(app, bodies)
    assert len(recording.calls) < len(bodies)  # merged into fewer searches
    assert sorted(q for call, _ in recording.calls for q in call) == sorted(queries)
    for body, response in zip(bodies, responses):
        expected = retriever.search(body["queries"], body["topk"])[0]
        got = response.json()["result"][0]
        assert [e["document"]["id"] for e in got] == [p.id for p in expected]
        assert [e["score"] for e in got] == [p.score for p in expected]


def test_retriever_failure_is_500_then_recovers(retriever):
    app = create_app(Recording(retriever))
    (failed,) = post_all(app, [{"queries": ["boom"]}])
    assert failed.status_code == 500 and "index on fire" in failed.json()["detail"]
    (ok,) = post_all(app, [{"queries": ["fish"], "topk": 1}])
    assert ok.json() == {"result": [[{"id": "d2", "contents": '"Fish"\nfish'}]]}


def test_health(retriever):
    async def run():
        transport = httpx.ASGITransport(app=create_app(retriever))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/health")

    response = asyncio.run(run())
    assert response.status_code == 200 and response.json() == {"status": "ok", "queue": 0, "truncated_queries": 0}


def test_overlong_queries_are_truncated_logged_and_counted(retriever, caplog):
    """One query over the limit no longer fails the batch (the original's client would die on
    the missing 'result'): it is cut to the limit, logged, counted, and every query answered."""
    recording = Recording(retriever)
    app = create_app(recording, max_query_chars=32)
    long_query = "fish " + "x" * 40  # 45 characters: searched as its first 32
    with caplog.at_level(logging.WARNING, logger="searchr1_jax.retrieval.server"):
        (response,) = post_all(app, [{"queries": ["dogs", long_query, "x" * 33], "topk": 1}])
    assert response.status_code == 200 and response.json()["truncated"] == [1, 2]
    assert recording.calls == [(["dogs", long_query[:32], "x" * 32], 1)]
    assert response.json()["result"] == [
        [{"id": "d1", "contents": '"Dogs"\ndog bird'}], [{"id": "d2", "contents": '"Fish"\nfish'}], [],
    ]  # fmt: skip
    assert "truncated 2 of 3 queries to 32 characters (queries[1, 2]: [45, 33] characters); 2 truncated so far" in caplog.text

    async def health():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return (await client.get("/health")).json()

    assert asyncio.run(health())["truncated_queries"] == 2
    (exact,) = post_all(app, [{"queries": ["y" * 32]}])  # at the limit: untouched, not counted
    assert exact.status_code == 200 and "truncated" not in exact.json() and asyncio.run(health())["truncated_queries"] == 2


def test_create_app_checks_its_limits(retriever):
    with pytest.raises(ValueError, match="default_topk must be between 1 and max_topk=5"):
        create_app(retriever, default_topk=6, max_topk=5)
