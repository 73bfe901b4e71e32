import copy

import pytest
import torch

TINY_ENCODERS = {
    "image_encoder": {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "num_heads": 4},
    "text_encoder": {"vocab_size": 64, "max_len": 16, "d_model": 32, "depth": 1, "num_heads": 4},
}


def tiny_config(architecture, **extra):
    config = copy.deepcopy(TINY_ENCODERS)
    config["architecture"] = architecture
    config.update(extra)
    if architecture == "two_tower":
        config.setdefault("embed_dim", 16)
    if architecture == "two_leg":
        config.setdefault("fusion", {"type": "concat_mlp", "dim": 32})
        config.setdefault("head", {"type": "classification", "num_classes": 5})
    if architecture in ("encoder_decoder", "encoder_text_decoder"):
        config.setdefault("decoder", {"d_model": 32, "depth": 1, "num_heads": 4, "max_len": 128})
    if architecture == "encoder_decoder":
        del config["text_encoder"]
    if architecture == "encoder_text_decoder":
        config["image_encoder"] = {"type": "conv", "image_size": 32, "channels": [16, 32], "d_model": 32}
    return config


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    ids = torch.randint(1, 64, (n, 7), generator=g)
    return images, ids


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
