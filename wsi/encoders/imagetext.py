"""The image-text protocol: what an encoder with `task="image-text"` offers beyond tile features.

    enc = create_encoder("quiltnet-b-16")
    tokens = enc.tokenize(["an H&E image of tumor", "an H&E image of normal tissue"])
    img = enc.encode_image(enc.preprocess(tiles))          # (B, E), L2-normalised
    txt = enc.encode_text(tokens)                          # (T, E), L2-normalised
    probs = (enc.logit_scale * img @ txt.T).softmax(-1)    # zero-shot

`forward(images)` stays what `wsi embed` stores (the registry's `dim`: for QuiltNet and PLIP the
projected image embedding before normalisation, for CONCH the pre-projection embedding the
authors recommend for MIL). `encode_image` / `encode_text` give embeddings in the shared space,
L2-normalised unless `normalize=False`. `clip/` (PathoCLIP) subclasses `ImageTextModel`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ImageTextModel(nn.Module):
    """Base of image-text encoders. Subclasses implement `features`, `_image`, `_text`,
    `_tokenize` and `_logit_scale`; the tokenizer is made on first use (it may need files).
    `without_text` (a reason) is set when only the image tower's weights were loaded: the text
    side then refuses to run rather than answer with random weights."""

    without_text: str | None = None
    features_are_embedding = True   # `forward` (what wsi embed stores) is `encode_image` before normalising

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self._image(images)
        return F.normalize(x, dim=-1) if normalize else x

    def _check_text(self) -> None:
        if self.without_text:
            from ..errors import EncoderError

            raise EncoderError(f"no text tower weights: {self.without_text}; load the whole model's weights "
                               "to encode text")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._check_text()
        x = self._text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        self._check_text()
        return self._tokenize(list(texts))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale().detach().exp()

    def _image(self, images):
        raise NotImplementedError

    def _text(self, tokens):
        raise NotImplementedError

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _logit_scale(self) -> torch.Tensor:
        raise NotImplementedError


def _lazy(make: Callable[[], Callable]) -> Callable[[], Callable]:
    cache: list[Callable] = []

    def get() -> Callable:
        if not cache:
            cache.append(make())
        return cache[0]
    return get


class OpenClipImageText(ImageTextModel):
    """An open_clip CLIP model. Features: `visual(x)`, the projected image embedding."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[], Callable]):
        super().__init__()
        self.inner = model
        self._tok = _lazy(tokenizer)

    def features(self, images):
        return self.inner.visual(images)

    def _image(self, images):
        return self.inner.encode_image(images, normalize=False)

    def _text(self, tokens):
        return self.inner.encode_text(tokens, normalize=False)

    def _tokenize(self, texts):
        return self._tok()(texts)

    def _logit_scale(self):
        return self.inner.logit_scale


def _tensor(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TransformersCLIPImageText(ImageTextModel):
    """A transformers CLIPModel (PLIP). Features: the projected image embedding."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[], Callable]):
        super().__init__()
        self.inner = model
        self._tok = _lazy(tokenizer)

    def features(self, images):
        return _tensor(self.inner.get_image_features(pixel_values=images))

    _image = features

    def _text(self, tokens):
        # CLIP's text tower is causal and pools at the first end-of-text token, so padding after it
        # needs no attention mask.
        return _tensor(self.inner.get_text_features(input_ids=tokens))

    def _tokenize(self, texts):
        tok = self._tok()
        if type(tok).__name__ == "SimpleTokenizer":  # open_clip's BPE (no hub tokenizer files)
            return tok(texts)
        n = min(int(self.inner.config.text_config.max_position_embeddings), 77)
        return tok(texts, padding="max_length", truncation=True, max_length=n, return_tensors="pt")["input_ids"]

    def _logit_scale(self):
        return self.inner.logit_scale


class ConchImageText(ImageTextModel):
    """CONCH (CoCa). Features: the pre-projection image embedding (`proj_contrast=False`), as the
    authors recommend for slide-level tasks; `encode_image` is the contrastive one."""

    features_are_embedding = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def features(self, images):
        return self.inner.encode_image(images, proj_contrast=False, normalize=False)

    def _image(self, images):
        return self.inner.encode_image(images, proj_contrast=True, normalize=False)

    def _text(self, tokens):
        return self.inner.encode_text(tokens, normalize=False)

    def _tokenize(self, texts):
        from conch.open_clip_custom import get_tokenizer, tokenize

        return tokenize(texts=texts, tokenizer=get_tokenizer())

    def _logit_scale(self):
        return self.inner.logit_scale
