"""The original pipeline's way from a reference photo to face features, for timing only.

The call structure of the original's ``__call__`` (``pipline_StableDiffusion_ConsistentID.py``)
up to the features it conditions on, with our core functions for each step (the same work):

1. ``get_prepare_faceid``: InsightFace ``app.get`` on ``np.array(PIL image)``, ``faces[0]``;
2. ``get_prepare_facemask``: BiSeNet parse at 512², the colour preview, a filled mask for every
   label present (``masks_for_unique_values``), then the facial keys;
3. ``get_image_embeds``: CLIP of the whole image, then CLIP of ``zeros_like`` of it (a fresh
   unconditional encode per generation), then the ID projection for cond and uncond;
4. ``get_prepare_clip_image``: one ``CLIPImageProcessor`` call per region crop, zero padding to 5;
5. ``get_facial_embeds``: CLIP of the 5 facial inputs (padding included) and CLIP of 5 zero images.

That is 4 CLIP calls over 12 images per generation, whatever the face; ours is one call over
the whole image, the crops actually found and one zero image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistentid_core.face import (
    EMBEDDING_DIM,
    MAX_FACIAL_PARTS,
    clip_pixel_values,
    colorize_parsing,
    masked_region_image,
    region_masks,
    select_facial_labels,
    to_rgb_uint8,
)

ClipFn = Callable[[torch.Tensor], torch.Tensor]


def original_face_features(image: Any, face_app: Any, face_parser: Any, clip: ClipFn, adapter: Any) -> dict[str, Any]:
    """Everything the original computes from its reference image before denoising (minus the prompt)."""
    photo = Image.fromarray(to_rgb_uint8(image))

    faces = face_app.get(np.array(photo))  # the original passes RGB to InsightFace
    embedding = faces[0].normed_embedding if faces else np.zeros(EMBEDDING_DIM, np.float32)
    faceid = torch.from_numpy(np.asarray(embedding, np.float32))[None]

    labels = face_parser.parse(np.array(photo))[0]
    preview = colorize_parsing(labels, np.array(photo))
    masks = region_masks(labels)
    facial = {label: masks[label] for label in select_facial_labels(np.unique(labels))}

    whole = clip_pixel_values(np.array(photo))
    whole_hidden = clip(whole)
    uncond_whole_hidden = clip(torch.zeros_like(whole))
    with torch.no_grad():
        id_tokens = adapter.id_tokens(faceid, whole_hidden)
        uncond_id_tokens = adapter.id_tokens(torch.zeros_like(faceid), uncond_whole_hidden)

    crops = [clip_pixel_values(masked_region_image(np.array(photo), mask)) for mask in facial.values()]
    padding = [torch.zeros(1, *whole.shape[1:]) for _ in range(MAX_FACIAL_PARTS - len(crops))]
    facial_pixels = torch.cat(crops + padding)
    facial_hidden = clip(facial_pixels)
    uncond_facial_hidden = clip(torch.zeros_like(facial_pixels))
    return {
        "id_tokens": id_tokens, "uncond_id_tokens": uncond_id_tokens, "facial_hidden": facial_hidden,
        "uncond_facial_hidden": uncond_facial_hidden, "labels": labels, "preview": preview, "regions": list(facial),
    }
