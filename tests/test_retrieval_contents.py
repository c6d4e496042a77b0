"""Passage text as the original sees it: `contents` stored and returned byte for byte, and
observations formatted from it exactly as Search-R1's client does.

The rule (shared/REFERENCE.md): `/retrieve` returns the corpus line's `contents` unchanged;
each hit is written `Doc {i}(Title: {first line of contents}) {the remaining lines joined
by \\n}\\n` and the concatenation is wrapped as `\\n\\n<information>{stripped}</information>\\n\\n`.
The expected strings below are written out by hand from that rule.
"""
import asyncio
import json

import httpx
import pytest

from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.client import parse_response
from searchr1_jax.retrieval.docstore import DocStore
from searchr1_jax.retrieval.observation import format_passages
from searchr1_jax.retrieval.server import create_app
from searchr1_jax.rollout.observations import passages_text

# (query word, stored contents, the hit's line in an observation as the original writes it)
CASES = [
    ("alpha", '"Paris"\nParis alpha is the capital.', 'Doc 1(Title: "Paris") Paris alpha is the capital.\n'),
    ("bravo", "Plain Title\nbravo text", "Doc 1(Title: Plain Title) bravo text\n"),
    ("charlie", "charlie is a passage without any newline", "Doc 1(Title: charlie is a passage without any newline) \n"),
    ("delta", '"Crlf"\r\ndelta one\r\nline two', 'Doc 1(Title: "Crlf"\r) delta one\r\nline two\n'),
    ("echo", '"The "Best" Film"\necho inner quotes', 'Doc 1(Title: "The "Best" Film") echo inner quotes\n'),
    ("foxtrot", '"Lone quote\nfoxtrot text', 'Doc 1(Title: "Lone quote) foxtrot text\n'),
    ("golf", '"Tabbed"\t\ngolf text', 'Doc 1(Title: "Tabbed"\t) golf text\n'),
    ("hotel", '"Lines"\nhotel one\nline two\n', 'Doc 1(Title: "Lines") hotel one\nline two\n\n'),
    ("india", '""\nindia untitled', 'Doc 1(Title: "") india untitled\n'),
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contents")
    rows = [{"id": f"p{i}", "contents": contents} for i, (_, contents, _) in enumerate(CASES)]
    rows.append({"id": "dpr", "title": "Kilo", "text": "kilo from a title/text corpus"})
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    build_bm25_index(tmp / "c.jsonl", tmp / "index", show_progress=False)
    return tmp / "index"


def test_passage_store_keeps_contents_byte_for_byte(index_dir):
    store = DocStore.open(index_dir)
    assert [p.contents for p in store] == [contents for _, contents, _ in CASES] + ['"Kilo"\nkilo from a title/text corpus']


@pytest.mark.parametrize("word, contents, line", CASES, ids=[c[0] for c in CASES])
def test_in_process_observation_is_the_originals(index_dir, word, contents, line):
    (hits,) = Bm25Retriever.load(index_dir, n_threads=1).search([word], 1)
    assert hits[0].contents == contents
    assert format_passages(hits) == line
    assert passages_text(hits) == "\n\n<information>" + line.strip() + "</information>\n\n"


def retrieve(app, body: dict) -> httpx.Response:
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/retrieve", json=body)

    return asyncio.run(run())


def test_server_returns_stored_contents_and_client_formats_like_the_original(index_dir):
    app = create_app(Bm25Retriever.load(index_dir, n_threads=1))
    words = [word for word, _, _ in CASES]
    for return_scores in (True, False):
        response = retrieve(app, {"queries": words, "topk": 1, "return_scores": return_scores})
        assert response.status_code == 200
        rows = response.json()["result"]
        documents = [row[0]["document"] if return_scores else row[0] for row in rows]
        assert [d["contents"] for d in documents] == [contents for _, contents, _ in CASES]
        # What our client makes of the answer is what the original's client makes of it.
        passages = parse_response(response.json(), len(words), "u")
        assert [format_passages(p) for p in passages] == [line for _, _, line in CASES]
    # Several hits: numbered from 1, concatenated, stripped once and wrapped.
    response = retrieve(app, {"queries": ["alpha"], "topk": 1, "return_scores": True})
    two = parse_response(response.json(), 1, "u")[0] + parse_response(retrieve(app, {"queries": ["bravo"], "topk": 1}).json(), 1, "u")[0]
    assert passages_text(two) == (
        '\n\n<information>Doc 1(Title: "Paris") Paris alpha is the capital.\n'
        "Doc 2(Title: Plain Title) bravo text</information>\n\n"
    )
