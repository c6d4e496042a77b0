"""Adopting a FAISS index built elsewhere (as Search-R1's e5_Flat.index is): checked against
the corpus and the encoder, served memory-mapped, optionally as fp16; the reference
embeddings come from transformers (torch), the index from faiss directly."""
import asyncio
import json
import os

import faiss
import httpx
import numpy as np
import pytest
from test_retrieval_dense import MAX_LENGTH, NUM_PASSAGES, _contents, _torch_embeddings, corpus, queries, tiny_e5, tokenizer  # noqa: F401

from searchr1_jax.retrieval import build_index
from searchr1_jax.retrieval.dense import DenseRetriever
from searchr1_jax.retrieval.faiss_adopt import adopt_faiss_index, read_index_mmap
from searchr1_jax.retrieval.index import load_retriever
from searchr1_jax.retrieval.server import create_app


@pytest.fixture(scope="module")
def passage_vectors(tiny_e5, corpus):
    """e5 convention ("passage: " + contents, mean pooling, unit length), computed with torch."""
    _, model, tok = tiny_e5
    return _torch_embeddings(model, tok, ["passage: " + _contents(r) for r in corpus[1]], "mean")


@pytest.fixture(scope="module")
def e5_flat(passage_vectors, corpus):
    """A flat inner-product index written by faiss directly, next to the corpus."""
    index = faiss.IndexFlatIP(passage_vectors.shape[1])
    index.add(passage_vectors)
    path = os.path.join(os.path.dirname(corpus[0]), "e5_Flat.index")
    faiss.write_index(index, path)
    return path


def test_adopts_a_flat_index_written_by_faiss_and_serves_it(e5_flat, tiny_e5, corpus, queries, passage_vectors, tmp_path, capsys):
    out = tmp_path / "adopted"
    argv = ["--corpus", corpus[0], "--method", "dense", "--faiss_index", e5_flat, "--encoder", tiny_e5[0], "--out", str(out),
            "--verify", "8", "--max-length", str(MAX_LENGTH)]
    assert build_index.main(argv) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["num_passages"] == NUM_PASSAGES and meta["index_file"] == e5_flat and meta["dim"] == 32
    assert meta["verified_passages"] == 8 and meta["verified_min_cosine"] > 0.9999
    assert sorted(os.listdir(out)) == ["docstore.arrow", "meta.json"]  # the index itself is not copied

    _, model, tok = tiny_e5
    texts, targets = queries
    retriever = load_retriever(out)
    assert isinstance(retriever, DenseRetriever)
    query_vectors = _torch_embeddings(model, tok, ["query: " + q for q in texts], "mean")
    scores = query_vectors @ passage_vectors.T
    for row, hits in zip(scores, retriever.search(texts, topk=3)):
        best = np.argsort(-row)[:3]
        assert [h.id for h in hits] == [f"doc{i}" for i in best]
        np.testing.assert_allclose([h.score for h in hits], row[best], atol=1e-5)

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(retriever)), base_url="http://test") as client:
            return await client.post("/retrieve", json={"queries": texts[:2], "topk": 1, "return_scores": True})

    body = asyncio.run(post()).json()
    assert [row[0]["document"]["contents"] for row in body["result"]] == [_contents(corpus[1][t]) for t in targets[:2]]


def test_fp16_copy_is_the_faiss_fp16_index_and_agrees(e5_flat, tiny_e5, corpus, queries, passage_vectors, tmp_path):
    out = tmp_path / "fp16"
    meta = adopt_faiss_index(corpus[0], e5_flat, tiny_e5[0], out, fp16=True, max_length=MAX_LENGTH, show_progress=False)
    assert meta["fp16"] and meta["index_file"] == "index.faiss"
    reference = faiss.IndexScalarQuantizer(32, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    reference.add(passage_vectors)
    assert (out / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()
    texts, _ = queries
    adopt_faiss_index(corpus[0], e5_flat, tiny_e5[0], tmp_path / "fp32", max_length=MAX_LENGTH, show_progress=False)
    full = DenseRetriever.load(tmp_path / "fp32")
    half = DenseRetriever.load(out)
    for a, b in zip(full.search(texts, 3), half.search(texts, 3)):
        assert [p.id for p in a][:1] == [p.id for p in b][:1]
        np.testing.assert_allclose([p.score for p in a], [p.score for p in b], atol=2e-3)


def test_mismatches_are_refused_naming_the_files(e5_flat, tiny_e5, corpus, passage_vectors, tmp_path):
    out = tmp_path / "out"
    longer = tmp_path / "longer.jsonl"
    longer.write_text(open(corpus[0]).read() + json.dumps({"id": "extra", "contents": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{e5_flat} holds 40 vectors but {longer} holds 41 passages"):
        adopt_faiss_index(longer, e5_flat, tiny_e5[0], out, max_length=MAX_LENGTH, show_progress=False)
    narrow = tmp_path / "narrow.index"
    faiss.write_index(faiss.IndexFlatIP(16), str(narrow))
    with pytest.raises(ValueError, match=r"dimension 16 but the encoder .* makes 32"):
        adopt_faiss_index(corpus[0], narrow, tiny_e5[0], out, max_length=MAX_LENGTH, show_progress=False)
    l2 = tmp_path / "l2.index"
    index = faiss.IndexFlatL2(32)
    index.add(passage_vectors)
    faiss.write_index(index, str(l2))
    with pytest.raises(ValueError, match="is not inner product"):
        adopt_faiss_index(corpus[0], l2, tiny_e5[0], out, max_length=MAX_LENGTH, show_progress=False)
    shuffled = tmp_path / "shuffled.index"
    index = faiss.IndexFlatIP(32)
    index.add(passage_vectors[::-1].copy())  # built from another passage order
    faiss.write_index(index, str(shuffled))
    with pytest.raises(ValueError, match=r"of 8 re-embedded passages differ from their stored vectors"):
        adopt_faiss_index(corpus[0], shuffled, tiny_e5[0], out, verify=8, max_length=MAX_LENGTH, show_progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_flat_index_is_memory_mapped(tmp_path):
    """Opening a 100 MB flat index adds file-backed pages at most, not anonymous memory."""
    vectors = np.random.default_rng(0).standard_normal((200_000, 128)).astype(np.float32)
    index = faiss.IndexFlatIP(128)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "big.index"))
    del index, vectors

    def anon_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))

    before = anon_kib()
    mapped = read_index_mmap(str(tmp_path / "big.index"))
    mapped.search(np.ones((1, 128), np.float32), 3)  # touches every vector
    assert mapped.ntotal == 200_000
    assert anon_kib() - before < 20_000  # < 20 MB of the 100 MB are process memory
