"""Socket types and the objects that travel on them.

``CONSISTENTID`` carries a :class:`runtime.LoadedConsistentID` (the adapter, its ModelPatcher and
its id); ``FACE_PARSER`` a
``consistentid_core.face.FaceParser``; ``FACE_ANALYSIS`` (ComfyUI's own socket type) a
``consistentid_core.face.FaceAnalyzer``; ``CONSISTENTID_FACE`` an :class:`EncodedFace`;
``CONSISTENTID_DESCRIBER`` a :class:`describe.LoadedDescriber` (a caption model and its ModelPatcher).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from consistentid_core.face_features import FaceFeatures

ConsistentIDModel = io.Custom("CONSISTENTID")
FaceParserType = io.Custom("FACE_PARSER")
ConsistentIDFace = io.Custom("CONSISTENTID_FACE")
FaceDescriberType = io.Custom("CONSISTENTID_DESCRIBER")

CATEGORY = "ConsistentID"


@dataclass(frozen=True, eq=False)
class EncodedFace:
    """A reference face ready for Apply ConsistentID: features, caption and ID tokens.

    ``id_tokens``/``uncond_id_tokens`` were made by the adapter whose id is ``adapter_id``; Apply
    recomputes them when it is given another adapter. ``provenance`` (model and image names, from a
    loaded face file) is written again when the face is saved.
    """

    features: FaceFeatures
    face_caption: str
    base_model: str
    adapter_id: str
    id_tokens: torch.Tensor
    uncond_id_tokens: torch.Tensor
    provenance: Mapping[str, str] = field(default_factory=dict)
