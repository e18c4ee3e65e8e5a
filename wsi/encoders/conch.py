"""CONCH (Mahmood Lab): a ViT-B/16 CoCa vision-language model; needs the authors' `conch` package.

Features are the pre-projection image embedding (the authors' choice for MIL); as an image-text
model it also encodes text with the authors' tokenizer."""
from .imagetext import ConchImageText
from .registry import CLIP_MEAN, CLIP_STD, register_encoder
from .weights import hub_file, load_safetensors, resolve_hub

_ARCH = "conch_ViT-B-16"


@register_encoder("conch", dim=512, input_size=448, mean=CLIP_MEAN, std=CLIP_STD, precision="fp16",
                  license="CC-BY-NC-ND-4.0", gated=True, hub_id="MahmoodLab/conch", family="conch", requires="conch",
                  task="image-text", description="pip install git+https://github.com/Mahmoodlab/CONCH.git")
def conch(spec, pretrained: bool = True, weights: str | None = None):
    import json

    from conch.open_clip_custom import create_model_from_pretrained
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.factory import CFG_DIR

    if pretrained:
        local = resolve_hub(spec.hub_id, spec.gated, spec.name)
        file = hub_file(local, "pytorch_model.bin")
        model, _ = create_model_from_pretrained(_ARCH, str(file) if file else f"hf_hub:{spec.hub_id}")
    else:  # the authors' create_model always loads a checkpoint: build the architecture itself
        cfg = json.loads((CFG_DIR / f"{_ARCH}.json").read_text())
        cfg.pop("custom_text", None)
        model = CoCa(**cfg)
        if weights:
            load_safetensors(model, weights, what=_ARCH)
    return ConchImageText(model)
