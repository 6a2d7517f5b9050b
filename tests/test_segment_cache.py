"""The frozen trunk's cached maps (imgclf/tasks/segment/cache.py) on real
CamVid frames: a crop window keeps every level in register with its mask,
the mirror copy is the trunk's answer to the mirrored image, and val scores
from the cache are the ones the predictor's path gives."""

from __future__ import annotations

import pytest
import torch

from imgclf.data.images import open_image
from imgclf.tasks.segment.cache import STRIDE, CachedSegFeatures, CachedSegVal
from imgclf.tasks.segment.data import read_dataset
from imgclf.tasks.segment.evaluate import evaluate_items
from imgclf.tasks.segment.metrics import scores
from imgclf.tasks.segment.model import Segmenter
from imgclf.tasks.segment.predictor import prepare_image
from imgclf.tasks.segment.torch_predictor import TorchSegPredictor
from tests.test_segment import CAMVID, VOID

pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/datasets/camvid")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ds = read_dataset(CAMVID, ignore_index=VOID, strict=False)
    model = Segmenter(len(ds.classes), pretrained=False)
    model.freeze_backbone(True)
    return ds, model.eval()


def test_crop_windows_keep_every_level_in_register_with_the_mask(setup):
    ds, model = setup
    cache = CachedSegFeatures(model, ds, [0, 1], 192, batch_size=3, crop=64, seed=1)
    assert len(cache.feats) == 4 and cache.masks[0].shape == (144, 192)  # 2 images x (as is, mirrored)
    seen = 0
    for feats, y in cache:
        assert y.shape[-2:] == (64, 64) and y.dtype == torch.int64
        assert [f.shape[-1] for f in feats] == [64 // r for r in (4, 8, 16, 32)]
        seen += len(y)
    assert seen == cache.steps * 3
    # A window is a slice of the whole image's maps at one 32-px-aligned offset on every level.
    g = torch.Generator().manual_seed(5)
    feats, y = cache._window(0, g)
    m = cache.masks[0]
    offs = [(oy, ox) for oy in range(0, m.shape[0] - 63, STRIDE) for ox in range(0, m.shape[1] - 63, STRIDE)
            if torch.equal(m[oy:oy + 64, ox:ox + 64], y)]
    assert offs
    oy, ox = offs[0]
    assert torch.equal(feats[0], cache.feats[0][0][:, oy // 4:oy // 4 + 16, ox // 4:ox // 4 + 16].float())


def test_the_mirror_copy_is_the_trunk_on_the_mirrored_image(setup):
    ds, model = setup
    cache = CachedSegFeatures(model, ds, [0], 128, batch_size=2, crop=None)
    assert torch.equal(cache.masks[1], cache.masks[0].flip(-1))
    x = prepare_image(open_image(ds.items[0].image), 128)[:, ::-1]
    x = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        want = model.features(x)[-1][0].half()
    assert torch.allclose(cache.feats[1][-1].float(), want.float(), atol=1e-2)


def test_cached_val_scores_are_the_predictors(setup):
    ds, model = setup
    items = [i for i, it in enumerate(ds.items) if it.split == "val"][:3]
    val = CachedSegVal(model, ds, items, 128)
    cached = scores(val.confusion(model, len(ds.classes), VOID), ds.classes)
    direct = evaluate_items(TorchSegPredictor(model, ds.classes, 128), ds, items)
    # float16 storage of the maps may flip a handful of near-tied pixels, nothing more
    assert abs(cached["pixel_accuracy"] - direct["pixel_accuracy"]) < 2e-3
    assert cached["pixels"] == direct["pixels"]
