"""Fashion-MNIST (the Debian package dataset-fashion-mnist), top-1 evaluation, and the ResNet-style
net that shiftc.vision trains on it: trained briefly, exported, compiled, and scored the same by
ONNX Runtime and the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import shiftc
from conftest import require
from shiftc.errors import BadInputError, UsageError
from shiftc.frontend import data

HAVE_DATA = os.path.isdir(os.environ.get("SHIFTC_FASHION_MNIST_DIR") or data.FASHION_MNIST_DIR)
# the net after TRAIN_STEPS steps (a tenth of an epoch) is far from trained but far from chance
TRAIN_STEPS = 60
MIN_TOP1_AFTER_TRAIN_STEPS = 0.5
# ONNX Runtime and the compiled library sum in other orders: an image whose two best logits are
# within float32 rounding of each other may go either way
MAX_TOP1_FLIPS = 2


@pytest.fixture(autouse=True)
def _dataset():
    require(HAVE_DATA, f"Fashion-MNIST is not installed (Debian package {data.FASHION_MNIST_PACKAGE})")


def test_fashion_mnist_splits():
    x, y = data.fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert np.bincount(y).tolist() == [6000] * 10  # balanced classes
    xt, yt = data.fashion_mnist_inputs("test", limit=100)
    assert xt.shape == (100, 1, 28, 28) and xt.dtype == np.float32 and yt.dtype == np.int64
    xn, _ = data.fashion_mnist_inputs("train")
    assert abs(float(xn.mean())) < 1e-3 and abs(float(xn.std()) - 1.0) < 1e-3  # the training set's mean / std


def test_missing_dataset_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTC_FASHION_MNIST_DIR", str(tmp_path))
    data.fashion_mnist.cache_clear()
    try:
        with pytest.raises(BadInputError, match="apt-get install dataset-fashion-mnist"):
            data.fashion_mnist("test")
    finally:
        data.fashion_mnist.cache_clear()


def test_trained_net_exports_compiles_and_scores_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SHIFTC_FASHION_STEPS", str(TRAIN_STEPS))
    onnx_path, lib = str(tmp_path / "cnn.onnx"), str(tmp_path / "cnn.so")
    shiftc.export("shiftc.vision:fashion_resnet", onnx_path)
    assert os.listdir(tmp_path / "cache" / "fashion")  # the trained weights are kept
    shiftc.compile(onnx_path, lib)
    ref = shiftc.evaluate(onnx_path, task="top1", limit=2000)
    r = subprocess.run([sys.executable, "-m", "shiftc", "eval", lib, "--task", "top1", "--limit", "2000", "--json"],
                       capture_output=True, text=True, check=True)
    got = json.loads(r.stdout)
    assert got["images"] == ref["images"] == 2000
    assert ref["top1"] > MIN_TOP1_AFTER_TRAIN_STEPS
    assert abs(got["top1"] - ref["top1"]) * 2000 <= MAX_TOP1_FLIPS


def test_top1_needs_an_image_classifier(tiny_llama):
    with pytest.raises(UsageError, match="--task top1 needs an image classifier"):
        shiftc.evaluate(tiny_llama[0], task="top1")
