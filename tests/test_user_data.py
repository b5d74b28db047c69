"""The user's own text for calibration and evaluation: plain text, JSON Lines, Parquet or strings,
split by document like the built-in corpus, with one clear error per kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import shiftc
from shiftc.errors import BadInputError, UsageError
from shiftc.frontend.data import load_user_texts

DOCS = [f"Document number {i} talks about topic {i % 7} in a few plain words." for i in range(40)]


def _write(tmp_path, kind: str, docs=DOCS):
    path = tmp_path / f"texts.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_every_format_reads_the_same_documents(tmp_path, kind):
    assert load_user_texts(_write(tmp_path, kind)) == DOCS


def test_splits_are_disjoint_and_complete():
    calib, ev = load_user_texts(DOCS, "calib"), load_user_texts(DOCS, "eval")
    assert calib and ev and not set(calib) & set(ev) and sorted(calib + ev) == sorted(DOCS)


def test_bad_input_gets_one_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(BadInputError, match="empty.txt': the file holds no text"):
        load_user_texts(str(empty))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x", "id": 2}) + "\n")
    with pytest.raises(BadInputError, match=r"wrong.jsonl', line 2: no string field 'text' \(has: body, id\)"):
        load_user_texts(str(wrong))
    with pytest.raises(BadInputError, match="missing.txt': no such file"):
        load_user_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="unknown split 'test'"):
        load_user_texts(DOCS, "test")


def test_evaluate_on_a_file_equals_the_same_strings(tiny_llama, smollm2_gguf_path, tmp_path):
    onnx_path, lib = tiny_llama
    path = _write(tmp_path, "jsonl")
    a = shiftc.evaluate(lib, data=path, tokens=256, window=64, tokenizer=smollm2_gguf_path)
    b = shiftc.evaluate(lib, data=iter(DOCS), tokens=256, window=64, tokenizer=smollm2_gguf_path)
    assert a["corpus"] == path and a["split"] == "all" and a["tokens_scored"] == b["tokens_scored"] > 0
    assert a["perplexity"] == b["perplexity"] and np.isfinite(a["perplexity"])
    with pytest.raises(UsageError, match=r"texts.jsonl \(all\), fewer than one window"):
        shiftc.evaluate(lib, data=path, tokens=256, window=4096, tokenizer=smollm2_gguf_path)


def test_compress_calibrates_on_the_users_text(tiny_llama, smollm2_gguf_path, tmp_path):
    onnx_path, _ = tiny_llama
    path = _write(tmp_path, "txt")
    rep = shiftc.compress(onnx_path, tmp_path / "sa.onnx", bits=3, group=32, calib_data=path, calib_windows=2,
                          calib_window=64, tokenizer=smollm2_gguf_path, report=False)
    assert rep["calibration"]["windows"] == 2 and all("rel_output_error" in e for e in rep["layers"].values())
    with pytest.raises(UsageError, match="--calib-windows 99: the .*texts.txt/all text holds only"):
        shiftc.compress(onnx_path, tmp_path / "sa2.onnx", bits=3, group=32, calib_data=path, calib_windows=99,
                        calib_window=64, tokenizer=smollm2_gguf_path)
    with pytest.raises(UsageError, match="--calib-data gives calibration text, --calib none"):
        shiftc.compress(onnx_path, tmp_path / "sa3.onnx", calib_data=path, calib="none")


def test_pruning_calibrates_on_the_users_text(tiny_llama, smollm2_gguf_path, tmp_path):
    """Activation pruning reads its norms from --calib-data too: a file too short for the windows
    asked fails naming that file (the built-in corpus would have had enough)."""
    onnx_path, _ = tiny_llama
    path = _write(tmp_path, "txt", DOCS[:3])
    with pytest.raises(UsageError, match="texts.txt"):
        shiftc.compress(onnx_path, tmp_path / "p.onnx", prune=0.25, calib_data=path, calib_windows=8,
                        calib_window=128, tokenizer=smollm2_gguf_path)
