"""Training data: deterministic builtin corpus and split, byte/HF tokenizers, DP slicing, prepare-data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4cli.train import data as D


def _corpus(tmp_path, n=12):
    root = tmp_path / "lib"
    for i in range(n):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (5 + i))
    (root / "site-packages" / "foreign").mkdir(parents=True)
    (root / "site-packages" / "foreign" / "skip.py").write_text("not stdlib\n")
    return root


def test_byte_tokenizer_eod_fits_vocab():
    assert D.ByteTokenizer(256).eod == 0  # NUL never occurs in Python source
    assert D.ByteTokenizer(512).eod == 256
    with pytest.raises(D.DataError, match="too small"):
        D.ByteTokenizer(100)
    assert D.ByteTokenizer(256).encode_array("aé").tolist() == [97, 195, 169]


def test_document_list_is_sorted_and_excludes_site_packages(tmp_path):
    root = _corpus(tmp_path)
    docs = D.stdlib_documents(root)
    assert docs == sorted(docs)
    assert len(docs) == 12
    assert not any("site-packages" in d for d in docs)


def test_split_is_deterministic_disjoint_and_covers_all_documents():
    docs = D.stdlib_documents()
    assert len(docs) > 500, "the stdlib corpus should have hundreds of files"
    train, held = D.split_documents(docs, 0.05)
    train2, held2 = D.split_documents(list(reversed(docs)), 0.05)
    assert set(train) == set(train2) and set(held) == set(held2)  # by document, independent of order
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(docs)
    assert 0.02 < len(held) / len(docs) < 0.09, len(held) / len(docs)


def test_builtin_samples_are_deterministic_shifted_windows(tmp_path):
    root = _corpus(tmp_path)
    tok = D.ByteTokenizer(256)
    a = D.BuiltinCorpus("train", tok, 16, 0.2, seed=3, root=root)
    b = D.BuiltinCorpus("train", tok, 16, 0.2, seed=3, root=root)
    for i in (0, 1, 7, 40):  # 40 wraps around into the next epoch
        ta, la, ma = a[i]
        tb, lb, _ = b[i]
        assert ta.shape == (16,) and np.array_equal(ta, tb) and np.array_equal(la, lb)
        assert np.array_equal(ta[1:], la[:-1]), "labels are the tokens shifted by one"
        assert ma.sum() == 16
    k0, k1 = a.window_index(0), a.window_index(1)
    assert k0 != k1 and sorted(a.window_index(i) for i in range(a.shuffle_block)) == list(range(a.shuffle_block))
    assert np.array_equal(a[0][0], a.stream.window(k0 * 16, 17)[:-1]), "sample 0 reads its shuffled window"
    held0 = D.BuiltinCorpus("valid", tok, 16, 0.2, seed=3, root=root)
    assert np.array_equal(held0[0][1][-1:], held0[1][0][:1]), "held-out windows continue the stream in order"
    c = D.BuiltinCorpus("train", tok, 16, 0.2, seed=4, root=root)
    assert c.documents != a.documents or len(a.documents) < 2
    held = D.BuiltinCorpus("valid", tok, 16, 0.2, seed=3, root=root)
    assert not set(held.documents) & set(a.documents)


def test_data_parallel_ranks_split_the_same_global_batch(tmp_path):
    root = _corpus(tmp_path)
    src = D.BuiltinCorpus("train", D.ByteTokenizer(256), 8, 0.2, seed=1, root=root)
    whole = D.microbatches(src, 12, global_batch=4, micro_batch=1, dp_rank=0, dp_size=1)
    parts = D.microbatches(src, 12, 4, 1, 0, 2) + D.microbatches(src, 12, 4, 1, 1, 2)
    assert len(whole) == 4 and len(parts) == 4
    for w, p in zip(whole, parts):
        assert np.array_equal(w["tokens"], p["tokens"]) and np.array_equal(w["labels"], p["labels"])
    assert whole[0]["position_ids"].tolist() == [list(range(8))]


def test_hf_tokenizer_file_is_loaded_with_its_eod(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = D.make_tokenizer(str(path), 256)
    assert t.vocab_size == 4 and t.eod == 1
    assert t.encode_array("hello world").tolist() == [2, 3]
    with pytest.raises(D.DataError, match="more than model.vocab_size"):
        D.make_tokenizer(str(path), 3)
    with pytest.raises(D.DataError, match="does not exist"):
        D.make_tokenizer(str(tmp_path / "missing.json"), 256)


def test_prepare_data_builds_an_indexed_dataset_megatron_reads(tmp_path, cpu_compat):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(30)) + "\n")
    info = D.prepare_data(str(src), str(tmp_path / "out" / "corpus"))
    assert info["documents"] == 30
    ds = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert len(ds) == 30
    first = ds[0]
    assert bytes(first[:-1].astype(np.uint8).tolist()).decode() == "document number 0 " * 20
    assert int(first[-1]) == info["eod"]
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files are renamed away"


def test_prepare_data_rejects_bad_lines(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: no string field 'text'"):
        D.prepare_data(str(src), str(tmp_path / "x"))
    assert not (tmp_path / "x.bin").exists()


def test_indexed_source_samples_through_megatron_gpt_dataset(tmp_path, cpu_compat):
    from dsv4cli.spec.schema import Spec

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": "abc " * (50 + i)}) for i in range(40)) + "\n")
    D.prepare_data(str(src), str(tmp_path / "c"))
    spec = Spec.model_validate({
        "model": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 1, "ffn_hidden_size": 8,
                  "vocab_size": 256, "seq_length": 16},
        "train": {"steps": 3, "micro_batch_size": 1, "global_batch_size": 2, "eval_batches": 1},
        "data": {"source": "indexed", "paths": [str(tmp_path / "c")], "valid_fraction": 0.1},
    })
    sources = D.build_sources(spec)
    tokens, labels, mask = sources.train[0]
    assert tokens.shape == (16,) and labels.shape == (16,)
    assert np.array_equal(tokens[1:], labels[:-1])
    assert len(sources.valid) >= 2
    again = D.build_sources(spec)
    assert np.array_equal(again.train[1][0], sources.train[1][0])


def test_mock_source(cpu_compat):
    from dsv4cli.spec.schema import Spec

    spec = Spec.model_validate({
        "model": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 1, "ffn_hidden_size": 8,
                  "vocab_size": 256, "seq_length": 16},
        "train": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 2},
        "data": {"source": "mock"},
    })
    s = D.build_sources(spec)
    assert s.train[0][0].shape == (16,) and len(s.valid) >= 1
