"""Bad inputs give ValueError/TypeError/IndexError naming expected and actual; never a crash."""
import pytest
import torch

import vlmkit
from conftest import batch, tiny_config


@pytest.fixture(scope="module")
def two_tower():
    return vlmkit.TwoTower(tiny_config("two_tower"))


def test_wrong_image_shapes(two_tower):
    _, ids = batch()
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\], got \[4, 32, 32\]"):
        two_tower(torch.rand(4, 32, 32), ids)
    with pytest.raises(ValueError, match="multiples of patch_size 8"):
        two_tower(torch.rand(4, 3, 30, 32), ids)
    with pytest.raises(ValueError, match="4 images and 3 texts"):
        two_tower(torch.rand(4, 3, 32, 32), ids[:3])
    with pytest.raises(TypeError, match="floating-point images"):
        two_tower(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), ids)


def test_wrong_token_ids(two_tower):
    images, ids = batch()
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 64\)"):
        two_tower(images, ids + 100)
    with pytest.raises(ValueError, match="exceeds max_len 16"):
        two_tower(images, torch.ones(4, 40, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        two_tower(images, ids.float())
    with pytest.raises(ValueError, match="padding_mask of shape"):
        two_tower(images, ids, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask of dtype bool"):
        two_tower(images, ids, torch.zeros_like(ids))


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown architecture 'three_tower'"):
        vlmkit.build_model({"architecture": "three_tower"})
    with pytest.raises(ValueError, match="unknown projector 'qformer'"):
        vlmkit.build_model({"architecture": "encoder_decoder", "projector": {"type": "qformer"}})
    with pytest.raises(ValueError, match="unknown config key 'projector.factor'.*'hidden_dim'"):
        vlmkit.build_model({"architecture": "encoder_decoder", "projector": {"type": "mlp", "factor": 2}})
    with pytest.raises(ValueError, match="unknown config key 'image_encoder.dpth'.*'depth'"):
        vlmkit.TwoTower(image_encoder={"dpth": 2})
    with pytest.raises(ValueError, match="width 100 must be divisible by num_heads 3"):
        vlmkit.TwoTower(image_encoder={"d_model": 100, "num_heads": 3})
    with pytest.raises(ValueError, match="patch_size 7 must divide image_size 64"):
        vlmkit.TwoTower(image_encoder={"patch_size": 7})
    with pytest.raises(ValueError, match="unknown fusion type 'sum'.*'gated'"):
        vlmkit.TwoLeg(fusion={"type": "sum"})
    with pytest.raises(TypeError, match="expected an integer, got string"):
        vlmkit.TwoTower(image_encoder={"depth": "2"})
    with pytest.raises(TypeError, match="expected config to be a dict"):
        vlmkit.build_model([1, 2])
    with pytest.raises(ValueError, match="unknown image pooling 'max'"):
        vlmkit.ViT(pool="max")
    with pytest.raises(ValueError, match="matching head has exactly 1 output"):
        vlmkit.TwoLeg(head={"type": "matching", "num_classes": 3})


def test_process_survives_and_keeps_working(two_tower):
    images, ids = batch()
    for bad in (torch.rand(1), torch.rand(0, 3, 32, 32), torch.rand(2, 3, 32, 32, 1)):
        with pytest.raises((ValueError, TypeError)):
            two_tower(bad, ids)
    assert torch.isfinite(two_tower(images, ids).loss)
