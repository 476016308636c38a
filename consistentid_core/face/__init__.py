"""Host-independent face pipeline: parsing, region crops, CLIP inputs, identity embeddings.

Pure torch/numpy/PIL/cv2; heavy dependencies (facexlib, transformers, insightface) are
imported only when the function that needs them runs.
"""

from consistentid_core.face.clip_preprocess import (
    CLIP_IMAGE_SIZE,
    MAX_FACIAL_PARTS,
    clip_image_processor,
    clip_pixel_values,
    facial_pixel_values,
    uncond_pixel_values,
)
from consistentid_core.face.identity import (
    EMBEDDING_DIM,
    FaceAnalyzer,
    insightface_model_dir,
    largest_first,
    load_face_analysis,
    select_providers,
)
from consistentid_core.face.images import to_rgb_uint8
from consistentid_core.face.labels import (
    FACIAL_PART_LABELS,
    LABEL_TO_PART,
    NUM_PARSING_CLASSES,
    REFERENCE_PART_NAMES,
    FaceLabel,
    select_facial_labels,
)
from consistentid_core.face.parsing import PARSING_SIZE, PART_COLORS, FaceParser, colorize_parsing
from consistentid_core.face.regions import (
    MASK_RESIZE_FILTER,
    facial_regions,
    masked_region_image,
    region_mask_tensor,
    region_masks,
    without_background_mask,
)

__all__ = [
    "CLIP_IMAGE_SIZE",
    "EMBEDDING_DIM",
    "FACIAL_PART_LABELS",
    "LABEL_TO_PART",
    "MASK_RESIZE_FILTER",
    "MAX_FACIAL_PARTS",
    "NUM_PARSING_CLASSES",
    "PARSING_SIZE",
    "PART_COLORS",
    "REFERENCE_PART_NAMES",
    "FaceAnalyzer",
    "FaceLabel",
    "FaceParser",
    "clip_image_processor",
    "clip_pixel_values",
    "colorize_parsing",
    "facial_pixel_values",
    "facial_regions",
    "insightface_model_dir",
    "largest_first",
    "load_face_analysis",
    "masked_region_image",
    "region_mask_tensor",
    "region_masks",
    "select_facial_labels",
    "select_providers",
    "to_rgb_uint8",
    "uncond_pixel_values",
]
