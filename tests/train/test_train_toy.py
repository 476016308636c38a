"""The training step and loop on the toy host (ComfyUI's patch protocol, tiny pure-torch models).

The same TrainingModule, patches, losses, checkpointing and loop run on ComfyUI's UNet in
tests/comfy_train; here they run without ComfyUI so CI covers them.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from consistentid_core import ConsistentIDAdapter
from consistentid_core.data import DataRoots, FGIDDataset, SampleOptions, collate, read_fgid
from tests.fixtures.clip_tokenizer import clip_tokenizer
from train.attention_patch import build_patch_plan, init_id_key_value_from_base, StepState
from train.checkpointing import find_checkpoint
from train.config import load_config
from train.fit import run
from train.hosts.toy import TOY_ADAPTER_DIMS, ToyHost
from train.step import LossConfig, TrainingModule, step_generator
from train.synthetic import write_synthetic_set
from train.tracking import read_metrics

RESOLUTION = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("fgid")
    json_path = write_synthetic_set(root, count=8, identities=4, size=RESOLUTION)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    clip_tokenizer().save_pretrained(tokenizer_dir)
    return json_path, tokenizer_dir


def _module(seed=0, attention="attn2"):
    torch.manual_seed(seed)
    host = ToyHost(clip_tokenizer())
    adapter = ConsistentIDAdapter.create("sd15", lora_rank=4, **TOY_ADAPTER_DIMS)
    init_id_key_value_from_base(adapter, host.base_weights())
    return TrainingModule(adapter, host, LossConfig(localization_attention=attention))


def _batches(json_path, count=2, size=4):
    root = json_path.parent
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    dataset = FGIDDataset(read_fgid(json_path).records, roots, clip_tokenizer(), SampleOptions(size=RESOLUTION), drop_prob=0.0)
    return [collate([dataset[(0, (b * size + i) % len(dataset))] for i in range(size)]) for b in range(count)]


def _eval_loss(module, batches, draws=3):
    """Mean loss over fixed noise/timestep draws (seed 99), so before and after see the same draws."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        losses = [float(module(batch, step_generator(99, i, 0, j, cpu))["loss"]) for i in range(draws) for j, batch in enumerate(batches)]
    return sum(losses) / len(losses)


def test_loss_decreases_over_a_few_dozen_steps(synthetic):
    """Held-out draws of noise and timesteps, same images: the loss after 40 steps is lower."""
    module = _module()
    batches = _batches(synthetic[0])
    optimizer = torch.optim.AdamW(module.adapter.parameters(), lr=3e-3)
    before = _eval_loss(module, batches)
    for step in range(40):
        loss = module(batches[step % 2], step_generator(0, step, 0, 0, torch.device("cpu")))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _eval_loss(module, batches)
    assert after < 0.95 * before, (before, after)


def test_one_step_sends_gradient_to_every_part_of_the_adapter(synthetic):
    module = _module()
    result = module(_batches(synthetic[0], 1)[0], step_generator(0, 0, 0, 0, torch.device("cpu")))
    result["loss"].backward()
    adapter = module.adapter
    slot_kinds = {"attn1": 0, "attn2": 0}
    for slot, layer in zip(adapter.slots, adapter.layers):
        for target in ("to_q", "to_k", "to_v", "to_out"):
            grad = layer.lora(target).up.weight.grad  # up starts at zero, so only up gets gradient at first
            assert grad is not None and grad.abs().sum() > 0, (slot.comfy_module, target)
        slot_kinds[slot.attn] += 1
        if slot.is_cross_attention:
            assert layer.to_k_ip.weight.grad.abs().sum() > 0 and layer.to_v_ip.weight.grad.abs().sum() > 0
    assert slot_kinds == {"attn1": 16, "attn2": 16}
    assert adapter.facial.fuse_module.mlp1.fc1.weight.grad.abs().sum() > 0
    assert adapter.facial.visual_projection.proj_in.weight.grad.abs().sum() > 0
    assert adapter.id_projection.proj[0].weight.grad.abs().sum() > 0
    assert result["facial_loss"] != 0


def test_id_key_value_start_as_the_unet_key_value(synthetic):
    module = _module()
    weights = module.host.base_weights()
    slot, layer = next(module.adapter.cross_attention_layers())
    assert torch.equal(layer.to_k_ip.weight, weights[f"diffusion_model.{slot.comfy_module}.to_k.weight"])


def test_patches_are_keyed_by_the_adapter_slots_and_capture_the_middle_layers():
    adapter = ConsistentIDAdapter.create("sd15", lora_rank=2, **TOY_ADAPTER_DIMS)
    plan = build_patch_plan(adapter, StepState(), localization_layers=5, localization_attention="attn2")
    assert {key for (attn, key) in plan.attention} == {s.patch_key for s in adapter.slots if s.is_cross_attention}
    assert len(list(plan.localization_layers())) == 11
    original = build_patch_plan(adapter, StepState(), localization_layers=5, localization_attention="attn1_original")
    assert sum(attn == "attn1" for attn, _ in original.attention) == 11
    assert set(plan.weight_wrappers) == {key for key, _ in adapter.lora_pairs()}


def test_original_attn1_localization_mode_trains(synthetic):
    """The original's self-attention maps at token positions: kept as a switch, still a finite loss."""
    module = _module(attention="attn1_original")
    result = module(_batches(synthetic[0], 1)[0], step_generator(0, 0, 0, 0, torch.device("cpu")))
    assert math.isfinite(float(result["loss"])) and result["facial_loss"] != 0


def _config(synthetic, out, **train):
    json_path, tokenizer_dir = synthetic
    overrides = [
        "model.kind=toy", f"model.tokenizer={tokenizer_dir}", "model.lora_rank=4",
        f"data.json={json_path}", f"data.image_root={json_path.parent / 'resize_IMG'}",
        f"data.parsing_root={json_path.parent / 'parsing_mask_IMG'}", f"data.id_embedding_root={json_path.parent / 'faceID'}",
        f"data.resolution={RESOLUTION}", "data.num_workers=0",
        f"train.output_dir={out}", "train.batch_size=2", "train.learning_rate=1e-3", "train.log_every=1",
        "train.sample_every=0", "train.log_with=none", "train.checkpoint_every=2", "train.gradient_accumulation_steps=2",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def test_resume_after_interruption_reproduces_the_uninterrupted_weights_exactly(synthetic, tmp_path):
    run(_config(synthetic, tmp_path / "straight", max_steps=4))
    run(_config(synthetic, tmp_path / "interrupted", max_steps=2))
    run(_config(synthetic, tmp_path / "interrupted", max_steps=4))
    straight = load_file(find_checkpoint(tmp_path / "straight", "auto") / "model.safetensors")
    resumed = load_file(find_checkpoint(tmp_path / "interrupted", "auto") / "model.safetensors")
    assert find_checkpoint(tmp_path / "interrupted", "auto").name == "step-00000004"
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0.0
    assert [m["loss"] for m in read_metrics(tmp_path / "straight")][2:] == [m["loss"] for m in read_metrics(tmp_path / "interrupted")][2:]


def test_non_finite_steps_are_skipped_and_too_many_stop_training(synthetic, tmp_path, monkeypatch):
    original = TrainingModule.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch, generator):
        result = original(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2
            result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(TrainingModule, "forward", sometimes_nan)
    summary = run(_config(synthetic, tmp_path / "nan", max_steps=3, gradient_accumulation_steps=1))
    assert summary["skipped_steps"] == 1
    weights = load_file(find_checkpoint(tmp_path / "nan", "auto") / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())

    monkeypatch.setattr(TrainingModule, "forward", lambda self, b, g: {**original(self, b, g), "loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(RuntimeError, match="consecutive steps with NaN"):
        run(_config(synthetic, tmp_path / "all_nan", max_steps=5, max_nonfinite_steps=1, gradient_accumulation_steps=1))


def test_gradient_checkpointing_gives_the_same_gradients(synthetic):
    """Recomputation re-runs the patches on the same path (and captures nothing twice)."""
    batch = _batches(synthetic[0], 1)[0]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        host = ToyHost(clip_tokenizer(), gradient_checkpointing=checkpointing)
        adapter = ConsistentIDAdapter.create("sd15", lora_rank=4, **TOY_ADAPTER_DIMS)
        init_id_key_value_from_base(adapter, host.base_weights())
        module = TrainingModule(adapter, host)
        module(batch, step_generator(0, 0, 0, 0, torch.device("cpu")))["loss"].backward()
        grads.append({n: p.grad for n, p in adapter.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6


def test_bf16_mixed_precision_run(synthetic, tmp_path):
    summary = run(_config(synthetic, tmp_path, max_steps=1, gradient_accumulation_steps=1, mixed_precision="bf16"))
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["last"]["loss"])
