"""The trainer on ComfyUI's own UNet, loaded from single-file checkpoints (tiny SD1.5/SDXL topologies).

The one trainer host: ComfyUI's checkpoint loader, its weight-wrapper LoRA path, the attention patches
at the adapter's slot keys, equality with the nodes' inference patch, the loss going down, exact resume,
skipped non-finite steps, export, and a 2-process ``accelerate launch`` (CPU, gloo) that ends with the
same weights on both ranks, reads disjoint shards, and whose resume with another world size is refused
or re-mapped.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


from tests.fixtures.tiny_training import RESOLUTION, REPO, model_config, overrides, training_module
def _batches(module, data, count=2):
    from consistentid_core.data import DataRoots, FGIDDataset, SampleOptions, collate, read_fgid

    root = data.parent
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    dataset = FGIDDataset(read_fgid(data).records, roots, module.host.tokenizer, SampleOptions(size=RESOLUTION), drop_prob=0.0)
    return [collate([dataset[(0, 2 * b)], dataset[(0, 2 * b + 1)]]) for b in range(count)]


def test_host_encodes_text_and_clip_images_as_the_nodes_do(comfy, monkeypatch):
    """SDXL text: CLIP-G gets the ids padded with 0 after the end token (the nodes' encode_token_ids);
    CLIP vision: the penultimate hidden states of ComfyUI's CLIP_VISION model, as the nodes compute them."""
    from consistentid_core.face import uncond_pixel_values
    from consistentid_core.prompt import encode_plain_text
    from train.hosts.comfy import ComfyHost

    host = ComfyHost(model_config(comfy, "sdxl"), comfy.root, torch.device("cpu"), torch.float32)
    seen = []
    original = type(host.clip).encode_from_tokens
    monkeypatch.setattr(type(host.clip), "encode_from_tokens", lambda self, tokens, **kw: seen.append(tokens) or original(self, tokens, **kw))
    ids = torch.tensor([encode_plain_text("a photo of a woman", host.tokenizer)])
    context, pooled = host.encode_text({"input_ids": ids, "text_only_input_ids": ids})
    assert pooled is not None and context.shape[:2] == (1, 77)
    ids_l, ids_g = [i for i, _ in seen[0]["l"][0]], [i for i, _ in seen[0]["g"][0]]
    end = ids_l.index(host.tokenizer.eos_token_id) + 1
    assert ids_l == ids[0].tolist() and ids_g[:end] == ids_l[:end] and set(ids_g[end:]) == {0}

    torch.manual_seed(0)
    pixels = torch.cat([torch.randn(2, 3, 224, 224), uncond_pixel_values(1)])
    with torch.no_grad():
        expected = host.clip_vision.model(pixel_values=pixels, intermediate_output=-2)[1].float()
    assert torch.allclose(host.clip_hidden_states(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("base_model, layers, captured, per_kind", [("sd15", 5, 11, 16), ("sdxl", 3, 36, 70)])
def test_one_step_on_comfy_unet_reaches_every_lora_and_id_projection(comfy, data, base_model, layers, captured, per_kind):
    """LoRA through ComfyUI weight wrappers, ID k/v through the attn2 patches at the slot keys."""
    from train.step import step_generator

    module = training_module(comfy, base_model, layers=layers)
    calls = []
    original_end = module.state.end
    module.state.end = lambda: calls.append(original_end()) or calls[-1]
    result = module(_batches(module, data, 1)[0], step_generator(0, 0, 0, 0, torch.device("cpu")))
    result["loss"].backward()
    adapter = module.adapter
    slot_kinds = {"attn1": 0, "attn2": 0}
    for slot, layer in zip(adapter.slots, adapter.layers):
        for target in ("to_q", "to_k", "to_v", "to_out"):  # up starts at zero, so only up gets gradient at first
            assert layer.lora(target).up.weight.grad.abs().sum() > 0, (slot.comfy_module, target)
        slot_kinds[slot.attn] += 1
        if layer.is_cross_attention:
            assert layer.to_k_ip.weight.grad.abs().sum() > 0 and layer.to_v_ip.weight.grad.abs().sum() > 0
    assert slot_kinds == {"attn1": per_kind, "attn2": per_kind}
    assert adapter.facial.fuse_module.mlp1.fc1.weight.grad.abs().sum() > 0
    assert adapter.facial.visual_projection.proj_in.weight.grad.abs().sum() > 0
    assert adapter.id_projection.proj[0].weight.grad.abs().sum() > 0
    assert len(calls[0]) == captured and result["facial_loss"] != 0
    assert all(p.grad is None for p in module.host.patcher.model.parameters())


def test_id_key_value_start_as_the_unet_key_value(comfy):
    module = training_module(comfy)
    weights = module.host.base_weights()
    slot, layer = next(module.adapter.cross_attention_layers())
    assert torch.equal(layer.to_k_ip.weight, weights[f"diffusion_model.{slot.comfy_module}.to_k.weight"])
    assert torch.equal(layer.to_v_ip.weight, weights[f"diffusion_model.{slot.comfy_module}.to_v.weight"])


def test_original_attn1_localization_mode_trains(comfy, data):
    """The original's self-attention maps at token positions: kept as a switch, still a finite loss."""
    import math

    from train.step import step_generator

    module = training_module(comfy, attention="attn1_original")
    result = module(_batches(module, data, 1)[0], step_generator(0, 0, 0, 0, torch.device("cpu")))
    assert math.isfinite(float(result["loss"])) and result["facial_loss"] != 0


def test_gradient_checkpointing_on_comfy_unet_gives_the_same_gradients(comfy, data):
    """ComfyUI's blocks share one transformer_options dict; recomputation must use each call's own values."""
    from train.step import step_generator

    grads = []
    for checkpointing in (False, True):
        module = training_module(comfy, gradient_checkpointing=checkpointing)
        module(_batches(module, data, 1)[0], step_generator(0, 0, 0, 0, torch.device("cpu")))["loss"].backward()
        grads.append({n: p.grad for n, p in module.adapter.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-5


def test_fine_tuning_starts_from_a_release_file_and_refuses_one_for_another_base(comfy, data, tmp_path):
    from consistentid_core import ConsistentIDAdapter, ModelMismatch
    from train.config import Config
    from train.fit import build_adapter
    from train.hosts.comfy import ComfyHost
    from train.step import TrainingModule

    config = Config(model=model_config(comfy))
    host = ComfyHost(config.model, comfy.root, torch.device("cpu"), torch.float32)
    config.model.init_from = str(comfy.paths["sd15_adapter"])
    adapter = build_adapter(config, host)
    release = ConsistentIDAdapter.load(comfy.paths["sd15_adapter"]).state_dict()
    assert all(torch.equal(adapter.state_dict()[k], release[k]) for k in release)
    TrainingModule(adapter, host)

    from tests.fixtures.tiny_ipadapter_faceid import ipadapter_faceid_plus_state, write_ipadapter_faceid_plus

    config.model.init_from = str(write_ipadapter_faceid_plus(tmp_path / "ip-adapter-faceid-plus_sd15.bin"))
    seeded = build_adapter(config, host)  # the paper's init: a fresh adapter with FaceID-Plus's projection and ID k/v
    faceid = ipadapter_faceid_plus_state()
    assert torch.equal(seeded.id_projection.state_dict()["proj.2.weight"], faceid["image_proj"]["proj.2.weight"])
    assert torch.equal(seeded.layers[1].to_k_ip.weight, faceid["ip_adapter"]["1.to_k_ip.weight"])
    assert all(torch.equal(layer.lora("to_q").up.weight, torch.zeros_like(layer.lora("to_q").up.weight)) for layer in seeded.layers)
    TrainingModule(seeded, host)
    with pytest.raises(ModelMismatch, match="sdxl adapter"):
        config.model.init_from = str(comfy.paths["sdxl_adapter"])
        build_adapter(config, host)
    other = ConsistentIDAdapter.create("sd15", lora_rank=4, channels=(64,) * 4, cross_attention_dim=64, clip_embedding_dim=32, facial_dim=64, facial_depth=2, id_depth=2)
    with pytest.raises(ModelMismatch, match="shapes differ"):
        TrainingModule(other, host)


def test_training_patch_computes_what_the_nodes_inference_patch_computes(comfy):
    """Same adapter, same tokens: trainable LoRA wrappers + live K/V == merged LoRA + precomputed K/V."""
    from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

    mm, comfy_sd = importlib.import_module("comfy.model_management"), importlib.import_module("comfy.sd")

    adapter = make_tiny_adapter("sd15", seed=3)
    module = training_module(comfy, adapter=adapter)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 64, generator=generator)
    tokens = torch.randn(1, 4, 64, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        module.state.begin(tokens, None)
        trained = module.host.predict_noise(x, timestep, context, {})
        module.state.end()
        base, _, _, _ = comfy_sd.load_checkpoint_guess_config(str(comfy.paths["sd15_checkpoint"]), output_vae=False, output_clip=False)
        patched = comfy.package.nodes.patch.patch_model(base, adapter, tokens, torch.zeros_like(tokens), weight=1.0, lora_strength=1.0)
        mm.load_models_gpu([patched])
        options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0]}
        inference = patched.model.diffusion_model(x, timesteps=timestep.float(), context=context, transformer_options=options)
        plain = base.model.diffusion_model(x, timesteps=timestep.float(), context=context, transformer_options={})
    assert (trained - inference).abs().max() < 1e-4
    assert (trained - plain).abs().max() > 1e-2  # the comparison is not vacuous


def _eval_loss(module, batches):
    from train.step import step_generator

    with torch.no_grad():
        losses = [float(module(b, step_generator(99, i, 0, j, torch.device("cpu")))["loss"]) for i in range(2) for j, b in enumerate(batches)]
    return sum(losses) / len(losses)


def test_loss_decreases_over_a_few_dozen_steps_on_comfy_unet(comfy, data):
    from train.step import step_generator

    module = training_module(comfy)
    batches = _batches(module, data)
    optimizer = torch.optim.AdamW(module.adapter.parameters(), lr=2e-3)
    before = _eval_loss(module, batches)
    for step in range(30):
        module(batches[step % 2], step_generator(0, step, 0, 0, torch.device("cpu")))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _eval_loss(module, batches)
    assert after < 0.9 * before, (before, after)


def test_resume_reproduces_uninterrupted_weights_and_ema_and_export_loads_back(comfy, data, tmp_path):
    """With ``ema_decay`` on: the EMA resumes exactly too, and it is what the final file and the export hold."""
    from consistentid_core import ConsistentIDAdapter
    from train.checkpointing import find_checkpoint
    from train.config import load_config
    from train.export import export
    from train.fit import run
    from train.tracking import read_metrics

    run(load_config(None, overrides(comfy, data, tmp_path / "straight", max_steps=4, ema_decay=0.5)))
    run(load_config(None, overrides(comfy, data, tmp_path / "interrupted", max_steps=2, ema_decay=0.5)))
    run(load_config(None, overrides(comfy, data, tmp_path / "interrupted", max_steps=4, ema_decay=0.5)))
    last = find_checkpoint(tmp_path / "straight", "auto")
    straight, straight_ema = load_file(last / "model.safetensors"), load_file(last / "ema.safetensors")
    resumed_at = find_checkpoint(tmp_path / "interrupted", "auto")
    resumed, resumed_ema = load_file(resumed_at / "model.safetensors"), load_file(resumed_at / "ema.safetensors")
    assert resumed_at.name == "step-00000004"
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0.0
    assert max((straight_ema[k] - resumed_ema[k]).abs().max().item() for k in straight_ema) == 0.0
    assert [m["loss"] for m in read_metrics(tmp_path / "straight")][2:] == [m["loss"] for m in read_metrics(tmp_path / "interrupted")][2:]
    name = "adapter.id_projection.proj.0.weight"
    assert not torch.equal(straight_ema[name], straight[name])  # the EMA lags the weights

    final = ConsistentIDAdapter.load(tmp_path / "straight" / "consistentid_adapter.safetensors").state_dict()
    assert torch.equal(final["id_projection.proj.0.weight"], straight_ema[name])
    outputs = [tmp_path / "adapter.bin", tmp_path / "adapter.safetensors"]
    export(tmp_path / "straight", outputs)
    export(tmp_path / "straight", [tmp_path / "raw.safetensors"], weights="raw")
    assert torch.equal(ConsistentIDAdapter.load(tmp_path / "raw.safetensors").state_dict()["id_projection.proj.0.weight"], straight[name])
    for path in outputs:
        adapter = ConsistentIDAdapter.load(path)
        assert torch.equal(adapter.state_dict()["id_projection.proj.0.weight"], straight_ema[name])
        base, _, _, _ = importlib.import_module("comfy.sd").load_checkpoint_guess_config(str(comfy.paths["sd15_checkpoint"]), output_vae=False, output_clip=False)
        comfy.package.nodes.patch.check_model(base, adapter)  # the nodes accept the export for this checkpoint


def test_non_finite_steps_are_skipped_and_too_many_stop_training(comfy, data, tmp_path, monkeypatch):
    from train.checkpointing import find_checkpoint
    from train.config import load_config
    from train.fit import run
    from train.step import TrainingModule

    original = TrainingModule.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch, generator):
        result = original(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2
            result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(TrainingModule, "forward", sometimes_nan)
    summary = run(load_config(None, overrides(comfy, data, tmp_path / "nan", max_steps=3)))
    assert summary["skipped_steps"] == 1 and summary["scaler_overflows"] == 0
    weights = load_file(find_checkpoint(tmp_path / "nan", "auto") / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())

    monkeypatch.setattr(TrainingModule, "forward", lambda self, b, g: {**original(self, b, g), "loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(RuntimeError, match="consecutive steps with NaN"):
        run(load_config(None, overrides(comfy, data, tmp_path / "all_nan", max_steps=3, max_nonfinite_steps=1)))


def test_bf16_mixed_precision_run(comfy, data, tmp_path):
    import math

    from train.config import load_config
    from train.fit import run

    summary = run(load_config(None, overrides(comfy, data, tmp_path, max_steps=1, mixed_precision="bf16")))
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["last"]["loss"])


def _launch_two_processes(comfy, data, out, records, **train):
    """The documented CPU launch (``train/configs/accelerate/cpu_2proc.yaml``: 2 processes, torchrun + gloo)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "train" / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", "0",
        str(REPO / "tests" / "fixtures" / "ranks.py"), "--config", str(REPO / "train" / "configs" / "sd15.yaml"),
        *[arg for pair in (("--set", o) for o in overrides(comfy, data, out, **train)) for arg in pair],
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CID_RECORD_DIR": str(records),
           "CID_INF_LOSS_RANK": "1", "CID_INF_LOSS_CALL": "2"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_stay_identical_read_disjoint_shards_and_resume_at_another_world_size(comfy, data, tmp_path, monkeypatch):
    """Rank 1 alone sees an infinite loss at step 2 (finite gradients): both ranks must skip it.

    Then the run is resumed by 1 process with batch size 2: refused by default, re-mapped on request
    to the rest of the same epoch (no sample trained twice).
    """
    from train.config import ConfigError, load_config
    from train.fit import run
    from train.step import TrainingModule
    from train.tracking import read_metrics

    out, records = tmp_path / "ddp", tmp_path / "records"
    records.mkdir()
    ranks = _launch_two_processes(comfy, data, out, records, max_steps=2, batch_size=1)
    checkpoint = out / "checkpoints" / "step-00000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    metrics = read_metrics(out)
    assert metrics[-1]["step"] == 2 and metrics[-1]["samples_per_second"] == pytest.approx(2 * metrics[-1]["steps_per_second"])
    assert (out / "consistentid_adapter.safetensors").is_file()
    assert [r["summary"]["skipped_steps"] for r in ranks] == [1, 1]
    digests = [r["summary"]["replica_digests"] for r in ranks]
    assert digests[0] == digests[1] and len(set(digests[0])) == 1
    shards = [{i for batch in r["indices"] for i in batch} for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]

    changed = overrides(comfy, data, out, max_steps=4, batch_size=2)
    with pytest.raises(ConfigError, match="world_size 2 → 1, batch_size 1 → 2"):
        run(load_config(None, changed))
    seen = []
    forward = TrainingModule.forward
    monkeypatch.setattr(TrainingModule, "forward", lambda self, b, g: seen.append(list(b["index"])) or forward(self, b, g))
    summary = run(load_config(None, [*changed, "train.on_shape_change=remap"]))
    assert summary["step"] == 4
    after = [i for batch in seen for i in batch]
    assert len(after) == 4 and not set(after) & (shards[0] | shards[1])
    assert set(after) | shards[0] | shards[1] == set(range(8))  # the whole epoch, each sample once


def test_prepare_fit_export_evaluate_chain_on_the_synthetic_set(comfy, data, tmp_path):
    """The four CLIs end to end: portraits → FGID set → training → release file → grid through the nodes → scores."""
    import json

    from consistentid_core import ConsistentIDAdapter
    from train import evaluate, export, prepare
    from train.config import load_config
    from train.fit import run

    portraits = data.parent / "resize_IMG"
    prepared = tmp_path / "prepared"
    prepare.main(["--images", str(portraits), "--out", str(prepared), "--face-parser", str(comfy.paths["face_parser"]),
                  "--insightface-root", str(comfy.models_dir / "insightface"), "--quiet"])
    rows = json.loads((prepared / "fgid.json").read_text())
    assert len(rows) == 8, (prepared / "skipped.json").read_text()

    settings = [o for o in overrides(comfy, prepared / "fgid.json", tmp_path / "run", max_steps=2)
                if not o.startswith(("data.image_root", "data.parsing_root", "data.id_embedding_root"))]
    settings += [f"data.image_root={prepared / 'resize_IMG'}", f"data.parsing_root={prepared / 'parsing_mask_IMG'}",
                 f"data.id_embedding_root={prepared / 'faceID'}"]
    run(load_config(None, settings))
    exported = tmp_path / "trained_consistentid.safetensors"
    export.main([str(tmp_path / "run"), "--out", str(exported)])
    assert ConsistentIDAdapter.load(exported).base_model == "sd15"

    identities = tmp_path / "identities"
    identities.mkdir()
    for name in ("id00_0000.png", "id01_0001.png"):
        (identities / name).write_bytes((portraits / name).read_bytes())
    (tmp_path / "prompts.txt").write_text("a photo of a person\na person wearing a red hat\n")
    evaluate.main(["generate", "--comfyui", str(comfy.root), "--adapter", str(exported), "--identities", str(identities),
                   "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "eval"), "--quiet",
                   "--set", "KSampler.steps=2", "--set", "EmptyLatentImage.width=128", "--set", "EmptyLatentImage.height=128"])
    manifest = evaluate.read_manifest(tmp_path / "eval" / "manifest.csv")
    assert len(manifest) == 4 and all(Path(r["image"]).is_file() for r in manifest)
    evaluate.main(["score", "--manifest", str(tmp_path / "eval" / "manifest.csv"), "--out", str(tmp_path / "eval"),
                   "--insightface-root", str(comfy.models_dir / "insightface"), "--insightface-name", "buffalo_l"])
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "FaceSim" in summary["overall"] and set(summary["skipped"]) == {"CLIP-T", "CLIP-I", "DINO", "FID"}
