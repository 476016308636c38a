"""The paper's evaluation metrics (ConsistentID §4.1), each usable only when its model is at hand.

=========  ==========================================================================  ==================
metric     what                                                                        model (local only)
=========  ==========================================================================  ==================
FaceSim    cosine of InsightFace ArcFace embeddings, reference vs generated face        InsightFace pack
CLIP-T     100 · cosine(CLIP image embedding, CLIP text embedding of the prompt)        CLIP (transformers)
CLIP-I     100 · cosine of CLIP image embeddings, reference vs generated                CLIP (transformers)
DINO       cosine of DINO ViT [CLS] features, reference vs generated                    DINO (transformers)
FID        Fréchet distance of Inception-v3 pool features, generated vs references       torchvision weights
=========  ==========================================================================  ==================

A metric whose model is missing or unloadable is skipped with a message that says which file was
expected; the others still run. Nothing is downloaded. FID uses torchvision's Inception-v3 weights
(``inception_v3_google-0cc3c7bd.pth``), not the TF-FID weights of ``pytorch-fid``, so its values are
comparable between our runs, not with numbers computed by other tools; with fewer images than
feature dimensions it is biased upwards (report the number of images with it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger("train.evaluate")


class MetricUnavailable(Exception):
    """The model a metric needs is missing or unusable; the message says what to provide."""


def _rgb(path: str | Path) -> Image.Image:
    return Image.open(path).convert("RGB")


class FaceSim:
    name = "FaceSim"

    def __init__(self, root: str | None, pack: str = "buffalo_l") -> None:
        if not root:
            raise MetricUnavailable("no --insightface-root given (the folder with models/<pack>/*.onnx)")
        from consistentid_core import ConsistentIDError
        from consistentid_core.face import FaceAnalyzer

        try:
            self.analyzer = FaceAnalyzer.load(root, pack)
        except ConsistentIDError as error:
            raise MetricUnavailable(str(error)) from error
        self._cache: dict[str, np.ndarray | None] = {}

    def _embedding(self, path: str) -> np.ndarray | None:
        if path not in self._cache:
            faces = self.analyzer.faces(np.asarray(_rgb(path)))
            self._cache[path] = np.asarray(faces[0].normed_embedding, np.float32) if faces else None
        return self._cache[path]

    def score(self, reference: str, image: str, prompt: str) -> float:
        a, b = self._embedding(reference), self._embedding(image)
        if a is None or b is None:
            return float("nan")  # no face: counted in the detection rate
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _load_hf(folder: str | None, what: str, option: str) -> tuple[Any, Any]:
    if not folder:
        raise MetricUnavailable(f"no {option} given (a local transformers {what} folder)")
    if not (Path(folder) / "config.json").is_file():
        raise MetricUnavailable(f"{folder} is not a transformers model folder (no config.json); expected a {what}")
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        processor = (AutoProcessor if what.startswith("CLIP") else AutoImageProcessor).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MetricUnavailable(f"{folder} could not be loaded as a {what}: {str(error).splitlines()[0]}") from error
    return model, processor


class ClipScores:
    """CLIP-T and CLIP-I from one CLIP model."""

    names = ("CLIP-T", "CLIP-I")

    def __init__(self, folder: str | None) -> None:
        self.model, self.processor = _load_hf(folder, "CLIP model (e.g. openai/clip-vit-large-patch14)", "--clip-model")
        if not hasattr(self.model, "get_text_features") or not hasattr(self.processor, "tokenizer"):
            raise MetricUnavailable(f"{folder} holds a {type(self.model).__name__}, not a CLIP model with its tokenizer")
        self._images: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _image(self, path: str) -> torch.Tensor:
        if path not in self._images:
            pixels = self.processor(images=_rgb(path), return_tensors="pt")["pixel_values"]
            self._images[path] = F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)), dim=-1)[0]
        return self._images[path]

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def score(self, reference: str, image: str, prompt: str) -> dict[str, float]:
        tokens = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True)
        text = F.normalize(self._features(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))), dim=-1)[0]
        generated = self._image(image)
        return {"CLIP-T": 100.0 * float(generated @ text), "CLIP-I": 100.0 * float(generated @ self._image(reference))}


class DinoScore:
    name = "DINO"

    def __init__(self, folder: str | None) -> None:
        self.model, self.processor = _load_hf(folder, "DINO ViT (e.g. facebook/dino-vits16)", "--dino-model")
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _cls(self, path: str) -> torch.Tensor:
        if path not in self._cache:
            pixels = self.processor(images=_rgb(path), return_tensors="pt")["pixel_values"]
            self._cache[path] = F.normalize(self.model(pixel_values=pixels).last_hidden_state[0, 0], dim=-1)
        return self._cache[path]

    def score(self, reference: str, image: str, prompt: str) -> float:
        return float(self._cls(reference) @ self._cls(image))


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception-v3 (ImageNet normalisation, 299×299 bilinear)."""

    def __init__(self, weights: str | None) -> None:
        if not weights:
            raise MetricUnavailable("no --inception-weights given (torchvision inception_v3_google-0cc3c7bd.pth)")
        if not Path(weights).is_file():
            raise MetricUnavailable(f"{weights} not found (torchvision's inception_v3_google-0cc3c7bd.pth)")
        from torchvision.models import inception_v3

        model = inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as error:  # wrong file: torch raises several types
            raise MetricUnavailable(f"{weights} is not a torchvision Inception-v3 state dict ({type(error).__name__})") from error
        model.fc = torch.nn.Identity()
        self.model = model.eval()
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, paths: Sequence[str], batch_size: int = 16) -> np.ndarray:
        features = []
        for start in range(0, len(paths), batch_size):
            images = [torch.from_numpy(np.asarray(_rgb(p).resize((299, 299), Image.Resampling.BILINEAR), np.float32) / 255.0).permute(2, 0, 1) for p in paths[start : start + batch_size]]
            batch = (torch.stack(images) - self.mean) / self.std
            features.append(self.model(batch).double().numpy())
        return np.concatenate(features)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (Heusel et al. 2017): ‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½).

    With centred features Xa, Xb (rows = images) and sample covariances Σ = XᵀX/(n − 1), the
    eigenvalues of ΣaΣb are the squared singular values of Xa·Xbᵀ over (na − 1)(nb − 1), so
    Tr((ΣaΣb)^½) is that matrix's nuclear norm over √((na − 1)(nb − 1)): exact, and an SVD of an
    na × nb matrix instead of a 2048 × 2048 matrix square root.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two images on each side")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    xa, xb = a - a.mean(0), b - b.mean(0)
    trace_a = (xa**2).sum() / (len(a) - 1)
    trace_b = (xb**2).sum() / (len(b) - 1)
    if min(len(a), len(b)) <= a.shape[1]:
        cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    else:  # more images than dimensions: Tr((Σa^½ Σb Σa^½)^½) with symmetric eigendecompositions
        values, vectors = np.linalg.eigh(xa.T @ xa / (len(a) - 1))
        root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
        cross = np.sqrt(np.linalg.eigvalsh(root_a @ (xb.T @ xb / (len(b) - 1)) @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + trace_b - 2 * cross)
