"""train.evaluate score: each metric on tiny random models in the real formats; missing ones skip."""

import csv
import json

import numpy as np
import pytest
import torch

from tests.fixtures.clip_tokenizer import clip_tokenizer
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from train import evaluate
from train.metrics import frechet_distance
from train.synthetic import write_synthetic_set



@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two identities × two prompts; the 'generated' images are other portraits of the same people."""
    root = tmp_path_factory.mktemp("grid")
    data = write_synthetic_set(root / "set", count=6, identities=2, size=160).parent / "resize_IMG"
    images = sorted(data.glob("*.png"))
    rows = []
    for identity in range(2):
        mine = [p for p in images if p.name.startswith(f"id{identity:02d}")]
        for index, prompt in enumerate(["a photo of a person", "a person wearing a red hat"]):
            rows.append({"identity": f"id{identity}", "reference": str(mine[0]), "prompt": prompt, "seed": 0, "image": str(mine[1 + index % 2])})
    rows.append({"identity": "id0", "reference": str(images[0]), "prompt": "a photo of a person", "seed": 1, "image": str(images[0])})
    manifest = root / "manifest.csv"
    evaluate.write_manifest(manifest, rows)
    return root, manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("models")
    make_tiny_insightface_pack(root / "insightface", "antelopev2")
    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(clip_config).save_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=clip_tokenizer()).save_pretrained(root / "clip")
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), root / "inception.pth")
    return root


def _score(grid, out, **models):
    argv = ["score", "--manifest", str(grid[1]), "--out", str(out)]
    for key, value in models.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    evaluate.main(argv)
    return json.loads((out / "results.json").read_text())


def test_every_metric_runs_on_tiny_models_and_identical_images_score_perfectly(grid, models, tmp_path):
    summary = _score(grid, tmp_path, insightface_root=models / "insightface", clip_model=models / "clip",
                     dino_model=models / "dino", inception_weights=models / "inception.pth")
    assert summary["skipped"] == {}
    assert set(summary["overall"]) == {"FaceSim", "CLIP-T", "CLIP-I", "DINO"}
    assert np.isfinite(summary["FID"]) and summary["images"] == 5
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    same = rows[-1]  # the row whose generated image is its reference
    assert float(same["FaceSim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(same["CLIP-I"]) == pytest.approx(100.0, abs=1e-3) and float(same["DINO"]) == pytest.approx(1.0, abs=1e-5)
    assert set(summary["identity"]) == {"id0", "id1"} and len(summary["prompt"]) == 2
    report = (tmp_path / "results.md").read_text()
    assert "| identity | FaceSim | CLIP-T | CLIP-I | DINO |" in report and "FID" in report
    assert (tmp_path / "plots" / "by_identity.png").is_file()


def test_missing_models_skip_their_metric_with_a_reason(grid, models, tmp_path):
    summary = _score(grid, tmp_path, insightface_root=models / "nowhere", clip_model=models / "clip")
    assert set(summary["overall"]) == {"CLIP-T", "CLIP-I"}
    assert "not found" in summary["skipped"]["FaceSim"] and "--dino-model" in summary["skipped"]["DINO"]
    assert "--inception-weights" in summary["skipped"]["FID"] and summary["FID"] is None
    assert "- DINO skipped:" in (tmp_path / "results.md").read_text()
    bad = _score(grid, tmp_path / "bad", clip_model=models / "dino", inception_weights=models / "clip" / "config.json")
    assert "CLIP-T" in bad["skipped"] and "not a torchvision Inception-v3" in bad["skipped"]["FID"]


def test_frechet_distance_matches_the_gaussian_closed_form():
    """1-D: (μa − μb)² + σa² + σb² − 2σaσb; identical sets give 0."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (400, 1)), rng.normal(-0.5, 0.5, (300, 1))
    expected = (a.mean() - b.mean()) ** 2 + a.var(ddof=1) + b.var(ddof=1) - 2 * np.sqrt(a.var(ddof=1) * b.var(ddof=1))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    x = rng.normal(size=(50, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    for a, b in ((rng.normal(size=(6, 20)), rng.normal(1, 2, size=(7, 20))), (rng.normal(size=(60, 5)), rng.normal(size=(70, 5)) @ rng.normal(size=(5, 5)))):
        from scipy import linalg

        sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb) - 2 * np.trace(linalg.sqrtm(sa @ sb).real)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)  # both branches (n < d and n > d)
