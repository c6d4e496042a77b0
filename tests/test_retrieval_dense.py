"""Dense retrieval: Flax BERT encoder parity with transformers, checkpoint loading, FAISS indexes,
resumable sharded builds.

Every model here is a random-weight tiny BERT built with transformers' BertConfig and a
WordPiece tokenizer trained on the test corpus with the `tokenizers` library.
"""
import json
import os
import shutil

import faiss
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from searchr1_jax.retrieval import dense
from searchr1_jax.retrieval.docstore import DocStore
from searchr1_jax.retrieval.encoder import (
    BGE_QUERY_INSTRUCTION,
    TextEmbedder,
    bucket_lengths,
    bucket_sizes,
    load_encoder,
    resolve_conventions,
)

NUM_PASSAGES = 40
SHARD_SIZE = 8  # -> 5 shards
MAX_LENGTH = 32
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _word(i: int) -> str:
    return SYLLABLES[i % len(SYLLABLES)] + SYLLABLES[(7 * i + 3) % len(SYLLABLES)]


def _corpus_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    words = [_word(i) for i in range(60)]
    rows = []
    for k in range(NUM_PASSAGES):
        text = " ".join(rng.choice(words, size=int(rng.integers(6, 14))))
        # Both corpus schemas, as users have them.
        if k % 2:
            rows.append({"id": f"doc{k}", "title": f"Topic {_word(k + 100)}", "text": text})
        else:
            rows.append({"id": f"doc{k}", "contents": f'"Topic {_word(k + 100)}"\n{text}'})
    return rows


def _contents(row: dict) -> str:
    return row["contents"] if "contents" in row else f'"{row["title"]}"\n{row["text"]}'


def _train_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def _save_tiny_bert(model_dir, tokenizer, weight_scale: float, seed: int = 0) -> BertModel:
    """A 2-layer, 32-wide BERT with every parameter redrawn, so that no part of it is an identity.

    Weights and biases ~ N(0, weight_scale²); LayerNorm scales ~ 1 + N(0, 0.1²) and shifts
    ~ N(0, 0.1²) (a large shared shift would make all embeddings point the same way).
    """
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif "LayerNorm.bias" in name:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * weight_scale)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer([_contents(r) for r in _corpus_rows()] + ["query: passage: represent this sentence"])


@pytest.fixture(scope="module")
def tiny_e5(tokenizer, tmp_path_factory):
    """(model_dir, torch model, tokenizer) in a directory named like an e5 model.

    Small weights keep this random network close to a bag of words, so a query that repeats
    most of a passage finds that passage (checked with torch for this seed: top-1 gaps > 1e-3).
    """
    model_dir = tmp_path_factory.mktemp("models") / "tiny-e5-base"
    model = _save_tiny_bert(model_dir, tokenizer, weight_scale=0.05)
    return str(model_dir), model, tokenizer


@pytest.fixture(scope="module")
def rough_e5(tokenizer, tmp_path_factory):
    """Like tiny_e5 with weights 6x larger: strongly non-linear, for parity."""
    model_dir = tmp_path_factory.mktemp("models") / "rough-e5"
    model = _save_tiny_bert(model_dir, tokenizer, weight_scale=0.3, seed=1)
    return str(model_dir), model, tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = _corpus_rows()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def _torch_embeddings(model, tokenizer, texts, pooling):
    batch = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if pooling == "mean":
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    else:
        pooled = hidden[:, 0]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


# ---------------------------------------------------------------- encoder


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_matches_transformers(rough_e5, pooling):
    model_dir, model, tokenizer = rough_e5
    encoder, tok, config = load_encoder(model_dir, pooling=pooling)
    embedder = TextEmbedder(encoder, tok, config, max_length=MAX_LENGTH, batch_size=3)
    texts = [
        "",
        "baba",
        " ".join(_word(i) for i in range(40)),  # longer than MAX_LENGTH: truncated
        "Topic kibe\nbaba dede fifo",
        "unseen-words xyzzy",
        " ".join(_word(i) for i in range(5, 14)),
        "dede",
    ]
    ours = embedder.embed_queries(texts)
    ref = _torch_embeddings(model, tokenizer, ["query: " + t for t in texts], pooling)
    assert ours.shape == (len(texts), 32) and ours.dtype == np.float32
    cosine = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # The texts' embeddings are far apart, so the cosine bound above is a real constraint.
    off_diagonal = (ours @ ours.T)[np.triu_indices(len(texts), 1)]
    assert off_diagonal.max() < 0.99, off_diagonal.max()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    # Batch composition and padding must not change a text's embedding.
    np.testing.assert_allclose(embedder.embed_queries(texts[3:4]), ours[3:4], atol=1e-6)


def test_bfloat16_encoder_stays_close_to_float32(rough_e5):
    texts = ["baba dede fifo", "Topic kibe\nnotu mabo gera", "dede"]
    full = TextEmbedder(*load_encoder(rough_e5[0]), max_length=MAX_LENGTH).embed_passages(texts)
    half = TextEmbedder(*load_encoder(rough_e5[0], jnp.bfloat16), max_length=MAX_LENGTH).embed_passages(texts)
    assert half.dtype == np.float32
    assert ((full * half).sum(-1)).min() > 0.999


def test_encoder_reads_e5_conventions(tiny_e5):
    _, _, config = load_encoder(tiny_e5[0])
    assert (config.family, config.query_prefix, config.passage_prefix, config.pooling) == ("e5", "query: ", "passage: ", "mean")
    assert config.model.num_layers == 2 and config.model.hidden_size == 32 and config.model.num_heads == 4


def test_bucket_sizes():
    assert bucket_lengths(256) == [16, 32, 64, 128, 256]
    assert bucket_lengths(100) == [16, 32, 64, 100]
    assert bucket_lengths(16) == [16]
    assert bucket_lengths(8) == [8]
    assert bucket_sizes(64, 1, 4) == [1, 4, 16, 64]
    assert bucket_sizes(50, 1, 4) == [1, 4, 16, 50]
    assert bucket_sizes(1, 1, 4) == [1]


def test_conventions_from_path(tmp_path):
    assert resolve_conventions("/models/multilingual-e5-large") == ("e5", "query: ", "passage: ", "mean")
    hf_cache = "/cache/models--intfloat--e5-base-v2/snapshots/0123abc"
    assert resolve_conventions(hf_cache)[0] == "e5"
    assert resolve_conventions("/m/bge-small-en-v1.5") == ("bge", BGE_QUERY_INSTRUCTION, "", "cls")
    assert resolve_conventions("/m/all-MiniLM-L6-v2") == ("sentence-transformers", "", "", "mean")
    assert resolve_conventions("/m/bge-small-en-v1.5", pooling="mean", query_prefix="") == ("bge", "", "", "mean")
    assert resolve_conventions("/snapshots/0123abc", name_or_path="BAAI/bge-base-en-v1.5")[0] == "bge"
    assert resolve_conventions("/m/e5-base-v2", name_or_path="BAAI/bge-base-en-v1.5")[0] == "e5"  # the path wins
    with pytest.raises(ValueError, match="cannot tell the model family"):
        resolve_conventions(str(tmp_path / "base5"))
    (tmp_path / "mine" / "1_Pooling").mkdir(parents=True)
    (tmp_path / "mine" / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert resolve_conventions(str(tmp_path / "mine")) == ("custom", "", "", "cls")
    with pytest.raises(ValueError, match="pooling must be one of"):
        resolve_conventions("/m/e5-small", pooling="max")


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return load_file(os.path.join(dst, "model.safetensors"))


def test_loader_accepts_prefixed_and_gamma_beta_keys(tiny_e5, tmp_path):
    model_dir, _, _ = tiny_e5
    weights = _copy_model(model_dir, tmp_path / "e5-old")
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in weights.items()}
    save_file(renamed, str(tmp_path / "e5-old" / "model.safetensors"))
    texts = ["baba dede", "Topic kibe"]
    ref = TextEmbedder(*load_encoder(model_dir), max_length=MAX_LENGTH).embed_passages(texts)
    got = TextEmbedder(*load_encoder(tmp_path / "e5-old"), max_length=MAX_LENGTH).embed_passages(texts)
    np.testing.assert_array_equal(got, ref)


def test_loader_reads_sharded_checkpoint(tiny_e5, tmp_path):
    model_dir, model, tokenizer = tiny_e5
    sharded = tmp_path / "e5-sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    texts = ["baba dede", "Topic kibe"]
    ref = TextEmbedder(*load_encoder(model_dir), max_length=MAX_LENGTH).embed_queries(texts)
    got = TextEmbedder(*load_encoder(sharded), max_length=MAX_LENGTH).embed_queries(texts)
    np.testing.assert_array_equal(got, ref)


def test_loader_rejects_missing_unexpected_and_misshapen_weights(tiny_e5, tmp_path):
    model_dir, _, _ = tiny_e5
    weights = _copy_model(model_dir, tmp_path / "e5-bad")
    path = str(tmp_path / "e5-bad" / "model.safetensors")
    broken = dict(weights)
    del broken["encoder.layer.1.output.dense.bias"]
    broken["cls.predictions.bias"] = np.zeros(3, np.float32)
    broken["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
    save_file(broken, path)
    with pytest.raises(ValueError) as err:
        load_encoder(tmp_path / "e5-bad")
    message = str(err.value)
    assert "e5-bad" in message
    assert "missing weights: encoder.layer.1.output.dense.bias" in message
    assert "unexpected weights: cls.predictions.bias" in message
    assert "encoder.layer.0.attention.self.key.weight: (31, 32) != (32, 32)" in message


def test_loader_rejects_bad_directories(tiny_e5, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_encoder(tmp_path)
    model_dir, _, _ = tiny_e5
    shutil.copytree(model_dir, tmp_path / "e5-roberta")
    config_path = tmp_path / "e5-roberta" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "roberta"}))
    with pytest.raises(ValueError, match=r"e5-roberta/config.json: field 'model_type' must be 'bert'"):
        load_encoder(tmp_path / "e5-roberta")
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "bert", "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match=r"config.json: field 'position_embedding_type' = 'relative_key' is not supported"):
        load_encoder(tmp_path / "e5-roberta")
    os.remove(tmp_path / "e5-roberta" / "model.safetensors")
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "position_embedding_type": "absolute"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_encoder(tmp_path / "e5-roberta")


# ---------------------------------------------------------------- index building and search


@pytest.fixture(scope="module")
def flat_index(tiny_e5, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("indexes") / "flat")
    dense.build_dense_index(corpus[0], out, tiny_e5[0], batch_size=4, shard_size=SHARD_SIZE, max_length=MAX_LENGTH, show_progress=False)
    return out


@pytest.fixture(scope="module")
def queries(corpus):
    """Query k repeats most of passage 5k's text, so passage 5k is the one it is built to match."""
    rows = corpus[1]
    targets = list(range(0, NUM_PASSAGES, 5))
    texts = []
    for k in targets:
        words = _contents(rows[k]).split()
        texts.append(" ".join(words[: max(4, len(words) - 2)]))
    return texts, targets


def test_index_directory_layout(flat_index, tiny_e5, corpus):
    assert sorted(os.listdir(flat_index)) == ["docstore.arrow", "index.faiss", "meta.json"]
    assert not os.path.exists(dense.staging_dir(flat_index))
    meta = json.loads(open(os.path.join(flat_index, "meta.json")).read())
    expected = {
        "method": "dense", "num_passages": NUM_PASSAGES, "corpus": corpus[0], "encoder": tiny_e5[0],
        "pooling": "mean", "query_prefix": "query: ", "passage_prefix": "passage: ",
        "index_type": "flat", "dim": 32, "max_length": MAX_LENGTH, "fp16": False,
    }
    assert {k: meta[k] for k in expected} == expected
    assert "created" in meta
    store = DocStore.open(flat_index)
    assert [p.id for p in store] == [r["id"] for r in corpus[1]]
    assert [p.contents for p in store] == [_contents(r) for r in corpus[1]]


def test_dense_search_matches_numpy_reference(flat_index, tiny_e5, corpus, queries):
    _, model, tokenizer = tiny_e5
    texts, targets = queries
    retriever = dense.DenseRetriever.load(flat_index)
    results = retriever.search(texts, topk=3)
    passages = _torch_embeddings(model, tokenizer, ["passage: " + _contents(r) for r in corpus[1]], "mean")
    query_vectors = _torch_embeddings(model, tokenizer, ["query: " + q for q in texts], "mean")
    scores = query_vectors @ passages.T
    for row, hits, target in zip(scores, results, targets):
        best = np.argsort(-row)[:3]
        assert [h.id for h in hits] == [f"doc{i}" for i in best]
        np.testing.assert_allclose([h.score for h in hits], row[best], atol=1e-5)
        assert hits[0].id == f"doc{target}"
        assert hits[0].contents == _contents(corpus[1][target])
    # topk beyond the corpus returns the whole corpus, best first.
    everything = retriever.search(texts[:1], topk=NUM_PASSAGES + 10)[0]
    assert len(everything) == NUM_PASSAGES
    assert all(a.score >= b.score for a, b in zip(everything, everything[1:]))
    assert retriever.search([], topk=3) == []
    with pytest.raises(ValueError, match="topk must be a positive integer"):
        retriever.search(texts, topk=0)


@pytest.mark.parametrize("index_type, fp16, kwargs", [("hnsw", False, {}), ("ivf", False, {"nlist": 2}), ("flat", True, {})])
def test_approximate_and_fp16_indexes_agree_with_flat(flat_index, tiny_e5, corpus, queries, tmp_path, index_type, fp16, kwargs):
    out = str(tmp_path / index_type)
    dense.build_dense_index(
        corpus[0], out, tiny_e5[0], index_type=index_type, fp16=fp16, batch_size=8, shard_size=16,
        max_length=MAX_LENGTH, show_progress=False, **kwargs,
    )
    index = faiss.read_index(os.path.join(out, "index.faiss"))
    expected_class = {"hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat, "flat": faiss.IndexScalarQuantizer}[index_type]
    assert isinstance(index, expected_class) and index.ntotal == NUM_PASSAGES
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    exact = dense.DenseRetriever.load(flat_index).search(queries[0], topk=NUM_PASSAGES)
    approx = dense.DenseRetriever.load(out, nprobe=2).search(queries[0], topk=3)
    for a, e in zip(approx, exact):
        if not fp16:
            assert [p.id for p in a] == [p.id for p in e[:3]]
            np.testing.assert_allclose([p.score for p in a], [p.score for p in e[:3]], atol=1e-5)
            continue
        # Half precision may swap near-ties below the top hit (gap > 1e-3 here), never more.
        exact_score = {p.id: p.score for p in e}
        assert a[0].id == e[0].id
        np.testing.assert_allclose([p.score for p in a], [exact_score[p.id] for p in a], atol=2e-3)
        assert min(p.score for p in a) >= e[2].score - 2e-3


def test_interrupted_build_resumes_to_the_same_index(tiny_e5, corpus, flat_index, tmp_path, monkeypatch):
    out = str(tmp_path / "resumed")
    staging = dense.staging_dir(out)
    real_save = dense._save_shard
    saved = []

    def save_then_crash(path, vectors):
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated crash after two shards")
        real_save(path, vectors)
        saved.append(os.path.basename(path))

    monkeypatch.setattr(dense, "_save_shard", save_then_crash)
    build = dict(batch_size=4, shard_size=SHARD_SIZE, max_length=MAX_LENGTH, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        dense.build_dense_index(corpus[0], out, tiny_e5[0], **build)
    assert not os.path.exists(out)
    assert sorted(os.listdir(os.path.join(staging, "shards"))) == ["emb_00000.npy", "emb_00001.npy"]
    first_shard = os.path.join(staging, "shards", "emb_00000.npy")
    first_mtime = os.stat(first_shard).st_mtime_ns

    # A resume with different settings is refused rather than mixing shards.
    with pytest.raises(ValueError, match="shard_size: was 8, now 16"):
        dense.build_dense_index(corpus[0], out, tiny_e5[0], **{**build, "shard_size": 16})

    resumed = []

    def save_and_record(path, vectors):
        assert os.stat(first_shard).st_mtime_ns == first_mtime  # finished shards are not redone
        real_save(path, vectors)
        resumed.append(os.path.basename(path))

    monkeypatch.setattr(dense, "_save_shard", save_and_record)
    dense.build_dense_index(corpus[0], out, tiny_e5[0], **build)
    assert resumed == ["emb_00002.npy", "emb_00003.npy", "emb_00004.npy"]
    assert not os.path.exists(staging)

    got = faiss.read_index(os.path.join(out, "index.faiss"))
    want = faiss.read_index(os.path.join(flat_index, "index.faiss"))
    np.testing.assert_array_equal(got.reconstruct_n(0, got.ntotal), want.reconstruct_n(0, want.ntotal))
    assert list(DocStore.open(out)) == list(DocStore.open(flat_index))


def test_existing_index_is_not_overwritten_unless_asked(tiny_e5, corpus, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    build = dict(batch_size=8, shard_size=64, max_length=MAX_LENGTH, show_progress=False)
    with pytest.raises(FileExistsError, match="taken already exists"):
        dense.build_dense_index(corpus[0], out, tiny_e5[0], **build)
    assert (out / "precious.txt").read_text() == "keep"
    dense.build_dense_index(corpus[0], out, tiny_e5[0], overwrite=True, pooling="cls", query_prefix="", **build)
    assert sorted(os.listdir(out)) == ["docstore.arrow", "index.faiss", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["pooling"], meta["query_prefix"], meta["passage_prefix"]) == ("cls", "", "passage: ")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging or retired copies left


def test_load_errors(flat_index, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(flat_index, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "encoder": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="gone.*not found; pass encoder_dir"):
        dense.DenseRetriever.load(copy)
    (copy / "meta.json").write_text(json.dumps({**meta, "method": "bm25"}))
    with pytest.raises(ValueError, match="method is 'bm25', not 'dense'"):
        dense.DenseRetriever.load(copy)


def test_build_finished_but_not_renamed_is_published_on_rerun(tiny_e5, corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "late")
    real_publish = dense.publish

    def crash(staging, out_dir, overwrite):
        raise KeyboardInterrupt("simulated crash before the rename")

    monkeypatch.setattr(dense, "publish", crash)
    build = dict(batch_size=8, shard_size=64, max_length=MAX_LENGTH, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        dense.build_dense_index(corpus[0], out, tiny_e5[0], **build)
    assert not os.path.exists(out)
    assert os.path.isfile(os.path.join(dense.staging_dir(out), "meta.json"))

    def must_not_embed(path, vectors):
        raise AssertionError("a finished build must not embed again")

    monkeypatch.setattr(dense, "publish", real_publish)
    monkeypatch.setattr(dense, "_save_shard", must_not_embed)
    dense.build_dense_index(corpus[0], out, tiny_e5[0], **build)
    assert sorted(os.listdir(out)) == ["docstore.arrow", "index.faiss", "meta.json"]
    assert len(DocStore.open(out)) == NUM_PASSAGES
