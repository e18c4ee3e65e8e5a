"""pathmil's `clip`: PathoCLIP, a pathology CLIP on the tile store (open_clip underneath).

- models: every image-text model behind one interface (`clip.models.load_model`): pathoclip-lite
  (offline, CPU), any open_clip architecture (ViT-B-16 = Patho-CLIP-B, ViT-L-14 = Patho-CLIP-L),
  QuiltNet, PLIP, CONCH, and trained runs; each is also a `wsi embed` encoder.
- data: captions for store tiles (CSV), image files (CSV), WebDataset shards; captions made from tile
  labels.
- train: contrastive training (`clip train`), locked-image or full, DDP under torchrun.
- zeroshot, retrieval, probe: the Patho-R1 evaluation protocol on store tiles.

The CLI is `clip` (clip/cli.py). OpenAI's CLIP packages (`openai-clip`, `clip-anytorch`) install a
top-level `clip` too; with one of them installed this package is shadowed, and `clip` says so.
"""
from __future__ import annotations

PATHMIL = True  # what `clip.cli` checks to tell pathmil's package from OpenAI's
