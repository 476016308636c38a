"""BiSeNet face parsing with the original ConsistentID preprocessing, on any device.

The network is facexlib's ``BiSeNet(num_class=19)``: its state dict and forward are
identical to face-parsing.PyTorch's model that ConsistentID uses (reference §3), and
unlike the original class it neither downloads ImageNet weights nor needs CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from consistentid_core.checkpoint.io import load_weights, unusable_file
from consistentid_core.errors import CheckpointFormatError, MissingModelError
from consistentid_core.face.images import to_rgb_uint8
from consistentid_core.face.labels import NUM_PARSING_CLASSES

__all__ = ["FaceParser", "PARSING_SIZE", "PART_COLORS", "colorize_parsing", "new_bisenet"]

logger = logging.getLogger(__name__)

PARSING_MODEL_FILE = "face_parsing.pth"
PARSING_MODEL_FOLDER = "models/face_parsing"
PARSING_MODEL_SOURCE = "the ConsistentID Hugging Face repo JackAILab/ConsistentID (file face_parsing.pth)"
PARSING_MODEL_FIX = f"download {PARSING_MODEL_FILE} again from Hugging Face JackAILab/ConsistentID into {PARSING_MODEL_FOLDER}"

# The original resizes every reference image to 512x512 (aspect ratio not kept) before parsing.
PARSING_SIZE = 512
# torchvision Normalize constants the original applies after ToTensor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The original pipeline's ``part_colors`` (first 19 of 24), index = label id; label 0 is
# never coloured (background stays white). We read them as RGB, as any RGB viewer showed
# the original's preview array.
PART_COLORS = np.array(
    [
        [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 0, 85], [255, 0, 170],
        [0, 255, 0], [85, 255, 0], [170, 255, 0], [0, 255, 85], [0, 255, 170],
        [0, 0, 255], [85, 0, 255], [170, 0, 255], [0, 85, 255], [0, 170, 255],
        [255, 255, 0], [255, 255, 85], [255, 255, 170], [255, 0, 255],
    ],
    dtype=np.uint8,
)


def new_bisenet() -> nn.Module:
    """An untrained BiSeNet(19 classes): the layout of the released face_parsing.pth."""
    # Imported lazily: facexlib imports all of its sub-packages (about 2 s).
    from facexlib.parsing.bisenet import BiSeNet

    return BiSeNet(num_class=NUM_PARSING_CLASSES)


def _read_state_dict(path: Path) -> dict[str, Any]:
    loaded = load_weights(path, "face parser", PARSING_MODEL_FIX)
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise unusable_file(path, "face parser", f"it holds a {type(loaded).__name__}, not a dict of tensors (a BiSeNet "
                            "state dict)", PARSING_MODEL_FIX)
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return loaded


def _layout_problems(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between two state-dict layouts (first few of each kind)."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [
        f"{key} {tuple(found[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in found and found[key].shape != value.shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
            problems.append(f"{len(items)} {title} ({shown})")
    return problems


def _preprocess(image_rgb: np.ndarray) -> torch.Tensor:
    """The original's input: PIL bilinear resize to 512x512, ToTensor, ImageNet normalise."""
    resized = Image.fromarray(image_rgb).resize((PARSING_SIZE, PARSING_SIZE), Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


class FaceParser:
    """A loaded BiSeNet in eval mode, float32, on one device."""

    def __init__(self, net: nn.Module, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.net = net.to(device=self.device, dtype=torch.float32).eval()

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> FaceParser:
        """Load the released ``face_parsing.pth`` (strict, ``weights_only``)."""
        path = Path(path)
        if not path.is_file():
            raise MissingModelError(
                f"Face parsing model not found: {path}. Put {PARSING_MODEL_FILE} (BiSeNet, "
                f"19 classes) in ComfyUI's {PARSING_MODEL_FOLDER} folder; get it from "
                f"{PARSING_MODEL_SOURCE}."
            )
        state_dict = _read_state_dict(path)
        net = new_bisenet()
        problems = _layout_problems(net.state_dict(), state_dict)
        if problems:
            raise CheckpointFormatError(
                f"{path.name} is not the BiSeNet face parser ConsistentID uses ({len(state_dict)} "
                f"entries, expected {len(net.state_dict())}: {'; '.join(problems)}); use "
                f"{PARSING_MODEL_FILE} from {PARSING_MODEL_SOURCE}."
            )
        net.load_state_dict(state_dict, strict=True)
        logger.info("Loaded face parser %s on %s", path, device or "cpu")
        return cls(net, device)

    def to(self, device: torch.device | str) -> FaceParser:
        """Move the network; returns self so it can be chained."""
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def parse(self, images: Sequence[Any] | np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Label maps (N, 512, 512) uint8 for one image (N = 1) or a list/batch of images.

        Images are RGB in any form ``to_rgb_uint8`` accepts, a 4-D batch included; they
        run through one forward per ``batch_size``. The maps are in the squashed
        512x512 frame the original used.
        """
        if getattr(images, "ndim", 0) == 4:  # numpy or torch batch (e.g. a ComfyUI IMAGE)
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        batch = torch.stack([_preprocess(to_rgb_uint8(image)) for image in images])
        labels = []
        with torch.inference_mode():
            for start in range(0, len(batch), batch_size):
                chunk = batch[start:start + batch_size].to(self.device)
                logits = self.net(chunk)[0]
                labels.append(logits.argmax(dim=1).to(torch.uint8).cpu())
        return torch.cat(labels).numpy()


def colorize_parsing(labels: np.ndarray, image_rgb: Any) -> np.ndarray:
    """Preview like the original's: 0.4 x image + 0.6 x part colour, background white.

    The image is resized to the label map's size with PIL bilinear (as the original's
    parsing input). The original blended a BGR-converted photo with the colour map,
    so its preview shows red and blue swapped; we blend the RGB photo and return RGB.
    """
    labels = np.asarray(labels)
    height, width = labels.shape
    image = Image.fromarray(to_rgb_uint8(image_rgb)).resize((width, height), Image.Resampling.BILINEAR)
    colors = np.full((height, width, 3), 255, dtype=np.uint8)
    foreground = labels > 0
    colors[foreground] = PART_COLORS[labels[foreground]]
    return cv2.addWeighted(np.array(image), 0.4, colors, 0.6, 0)
