"""The registry: every model builds and runs; pretrained weights really load."""

import pytest
import torch
from PIL import Image

from imgclf.data.preprocess import eval_transform, normalize
from imgclf.models.registry import MODELS, WeightsUnavailable, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_runs_64px(name):
    m = build_model(name, num_classes=3, pretrained=False, head_hidden=(16,)).eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 64, 64)
        logits = m(x)
        f = m.forward_features(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert f.shape == (2, m.num_features)
    m.reset_classifier(5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_lite0_imagenet_weights_recognise_a_dog(tiny):
    """The renamed PyPI weights give ImageNet predictions: dog photos land in
    ImageNet's dog classes (151-268), which random weights would not do."""
    import timm

    from imgclf.models.registry import _lite_weights_file, convert_lite_state_dict

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.load_state_dict(convert_lite_state_dict(torch.load(_lite_weights_file(0), weights_only=True), m))
    m.eval()
    pp = MODELS["efficientnet_lite0"].preprocess
    files = sorted((tiny / "val" / "dogs").iterdir())[:8]
    x = normalize(torch.stack([eval_transform(pp)(Image.open(f).convert("RGB")) for f in files]), pp)
    with torch.inference_mode():
        top = m(x).argmax(1)
    assert ((top >= 151) & (top <= 268)).float().mean() >= 0.75


def test_torchvision_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailable) as e:
        build_model("resnet18", 2, pretrained=True)
    msg = str(e.value)
    assert "--weights" in msg and "--no-pretrained" in msg and "resnet18" in msg


def test_torchvision_local_weights_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = build_model("resnet18", 2, pretrained=True, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)


def test_small_cnn_model_files_from_imgclf_0_1_load_as_the_padded_network():
    """imgclf 0.1 saved its padded small_cnn under the name small_cnn; the
    unpadded small_cnn has weights of the same shapes, so such a file must be
    recognised and rebuilt as small_cnn_padded, computing what it computed then."""
    from imgclf.data.preprocess import Preprocess
    from imgclf.models.records import make_model_record, model_from_record
    from imgclf.models.registry import SmallCNN, SmallCNNPadded

    torch.manual_seed(0)
    old = build_model("small_cnn_padded", num_classes=4, pretrained=False).eval()
    rec = make_model_record(old, "small_cnn", list("abcd"), Preprocess(size=28), {})  # as 0.1 wrote it
    x = torch.randn(3, 3, 28, 28)
    loaded = model_from_record(rec)
    assert isinstance(loaded.backbone, SmallCNNPadded)
    with torch.inference_mode():
        assert torch.equal(loaded(x), old(x))
    new = build_model("small_cnn", num_classes=4, pretrained=False).eval()
    assert isinstance(model_from_record(make_model_record(new, "small_cnn", list("abcd"), Preprocess(size=28),
                                                          {})).backbone, SmallCNN)


def test_small_cnn_needs_its_minimum_input_and_says_so(tmp_path, tiny):
    from .conftest import imgclf

    p = imgclf("train", tiny, "--out", tmp_path / "r", "--model", "small_cnn", "--image-size", "16", check=False)
    assert p.returncode != 0 and "--image-size 16 is too small for small_cnn" in p.stderr
    assert "use --image-size 18 or more" in p.stderr and not (tmp_path / "r" / "model.pt").exists()
