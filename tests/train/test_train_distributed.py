"""Trainer logic that must hold at any world size, checked without a model: seeds, run shapes, updates.

The multi-process runs themselves (gloo, ComfyUI's UNet on tiny checkpoints) are in
tests/comfy/test_train_comfy.py.
"""

import itertools

import pytest
import torch

from consistentid_core import ConsistentIDAdapter
from consistentid_core.data import ResumableBatchSampler
from train.attention_patch import StepState, build_patch_plan
from train.config import ConfigError
from train.replicas import weights_digest
from train.run_shape import RunShape, resume_start_batch
from train.step import step_seed
from train.update import Outcome, apply_update

SMALL_ADAPTER = dict(channels=(32,) * 4, cross_attention_dim=64, clip_embedding_dim=32, facial_dim=64, facial_depth=2, id_depth=2)


def test_micro_batch_seeds_never_collide_across_processes_steps_and_micro_steps():
    keys = list(itertools.product(range(40), range(16), range(4)))  # step, rank, micro
    seeds = {step_seed(0, *key) for key in keys}
    assert len(seeds) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)
    # the formula it replaces collides at this scale: rank 10 at step s == rank 0 at step s+1, micro-1
    old = {(0 * 1_000_003 + s * 1009 + r * 101 + m) for s, r, m in keys}
    assert len(old) < len(keys)
    assert step_seed(1, 0, 0, 0) != step_seed(0, 0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        step_seed(0, -1, 0, 0)


def _consumed(shape: RunShape, start: int, batches: int) -> list[tuple[int, int]]:
    """(epoch, sample) pairs read by all processes of ``shape`` from per-process batch ``start`` on."""
    seen = []
    for rank in range(shape.world_size):
        sampler = ResumableBatchSampler(shape.dataset_size, shape.batch_size, shape.world_size, rank, shape.seed, start)
        seen += [pair for batch in itertools.islice(iter(sampler), batches) for pair in batch]
    return seen


def test_processes_read_disjoint_shards_of_each_epoch():
    shape = RunShape(world_size=3, batch_size=2, gradient_accumulation_steps=1, seed=5, dataset_size=20)
    shards = []
    for rank in range(shape.world_size):
        sampler = ResumableBatchSampler(20, 2, 3, rank, 5, 0)
        shards.append({pair for batch in itertools.islice(iter(sampler), shape.batches_per_epoch) for pair in batch})
    assert all(len(s) == 6 for s in shards)
    assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])


def test_an_unchanged_shape_resumes_at_step_times_accumulation():
    shape = RunShape(2, 4, 3, 0, 100)
    assert resume_start_batch(shape, shape, 7, "refuse") == 21
    assert resume_start_batch(None, shape, 7, "refuse") == 21  # checkpoints from before the shape was stored


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(world_size=1), "world_size 2 → 1"),
        (dict(batch_size=2), "batch_size 4 → 2"),
        (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps 3 → 1"),
        (dict(dataset_size=90), "dataset_size 100 → 90"),
    ],
)
def test_a_changed_shape_is_refused_with_what_changed(changed, message):
    saved = RunShape(2, 4, 3, 0, 100)
    current = RunShape(**{**saved.to_dict(), **changed})
    with pytest.raises(ConfigError, match=message) as error:
        resume_start_batch(saved, current, 5, "refuse")
    assert "on_shape_change: remap" in str(error.value)


def test_a_changed_seed_is_refused_even_when_remapping():
    with pytest.raises(ConfigError, match="seed 0, this run has seed 1"):
        resume_start_batch(RunShape(2, 4, 1, 0, 100), RunShape(2, 4, 1, 1, 100), 5, "remap")


@pytest.mark.parametrize(
    "old, new, steps",
    [
        (RunShape(2, 1, 1, 3, 8), RunShape(1, 2, 1, 3, 8), 2),  # 4 of 8 used: the other 4, nothing repeated
        (RunShape(4, 2, 2, 3, 64), RunShape(2, 3, 1, 3, 64), 2),
        (RunShape(2, 3, 1, 3, 50), RunShape(3, 2, 2, 3, 50), 3),
        (RunShape(2, 2, 1, 3, 16), RunShape(1, 3, 1, 3, 16), 4),  # epoch 0 complete: start epoch 1
    ],
)
def test_remapping_continues_the_epoch_without_repeating_a_sample(old, new, steps):
    """Independent check: read what both runs actually draw from the samplers."""
    before = _consumed(old, 0, steps * old.gradient_accumulation_steps)
    start = resume_start_batch(old, new, steps, "remap")
    epoch = max(e for e, _ in before)
    global_batch = new.batch_size * new.world_size
    epoch_size = new.batches_per_epoch * global_batch  # what the new run reads of an epoch (drop_last)
    after = _consumed(new, start, new.batches_per_epoch)  # at least the rest of the epoch
    first_epoch_after = min(e for e, _ in after)
    used = {pair for pair in before if pair[0] == first_epoch_after}
    rest = [pair for pair in after if pair[0] == first_epoch_after]
    assert not used & set(rest)  # nothing repeated
    assert len(used) + len(rest) > epoch_size - global_batch  # less than one global batch skipped
    assert first_epoch_after in (epoch, epoch + 1)


def test_patches_are_keyed_by_the_adapter_slots_and_capture_the_middle_layers():
    adapter = ConsistentIDAdapter.create("sd15", lora_rank=2, **SMALL_ADAPTER)
    plan = build_patch_plan(adapter, StepState(), localization_layers=5, localization_attention="attn2")
    assert {key for (attn, key) in plan.attention} == {s.patch_key for s in adapter.slots if s.is_cross_attention}
    assert len(list(plan.localization_layers())) == 11
    original = build_patch_plan(adapter, StepState(), localization_layers=5, localization_attention="attn1_original")
    assert sum(attn == "attn1" for attn, _ in original.attention) == 11
    assert set(plan.weight_wrappers) == {key for key, _ in adapter.lora_pairs()}


def test_weights_digest_sees_a_one_ulp_difference():
    a = {"w": torch.ones(3)}
    b = {"w": torch.nextafter(torch.ones(3), torch.full((3,), 2.0))}
    assert weights_digest(a.items()) == weights_digest({"w": torch.ones(3)}.items())
    assert weights_digest(a.items()) != weights_digest(b.items())


def _prepared(scaler: bool):
    """A real accelerate optimizer, with a real (CPU) GradScaler when asked: the fp16 path without a GPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    if scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
    model = torch.nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator, model, optimizer


def _step(accelerator, model, optimizer, poison_gradient=False, loss_value=None):
    loss = model(torch.ones(2, 3)).pow(2).mean()
    handle = model.weight.register_hook(lambda g: g * float("inf")) if poison_gradient else None
    (accelerator.scaler.scale(loss) if accelerator.scaler is not None else loss).backward()
    if handle:
        handle.remove()
    losses = torch.tensor([float(loss.detach()) if loss_value is None else loss_value])
    return apply_update(accelerator, optimizer, list(model.parameters()), losses, 1.0)


def test_loss_scale_overflows_are_not_failures_until_the_scale_falls_below_one():
    accelerator, model, optimizer = _prepared(scaler=True)
    before = model.weight.detach().clone()
    outcomes = [_step(accelerator, model, optimizer, poison_gradient=True).outcome for _ in range(3)]
    assert outcomes == [Outcome.OVERFLOW, Outcome.OVERFLOW, Outcome.NONFINITE]  # scale 4 → 2 → 1 → 0.5
    assert torch.equal(model.weight, before)
    assert _step(accelerator, model, optimizer).outcome is Outcome.UPDATED
    assert not torch.equal(model.weight, before)


def test_without_a_scaler_non_finite_gradients_or_losses_are_failures():
    accelerator, model, optimizer = _prepared(scaler=False)
    before = model.weight.detach().clone()
    assert _step(accelerator, model, optimizer, poison_gradient=True).outcome is Outcome.NONFINITE
    assert _step(accelerator, model, optimizer, loss_value=float("inf")).failed
    assert torch.equal(model.weight, before) and model.weight.grad is None
    assert _step(accelerator, model, optimizer).outcome is Outcome.UPDATED


def test_a_non_finite_loss_with_a_scaler_leaves_the_scaler_usable():
    """Skipped before unscale_: the next step must not hit 'unscale_() has already been called'."""
    accelerator, model, optimizer = _prepared(scaler=True)
    assert _step(accelerator, model, optimizer, loss_value=float("nan")).outcome is Outcome.NONFINITE
    assert accelerator.scaler.get_scale() == 4.0
    assert _step(accelerator, model, optimizer).outcome is Outcome.UPDATED


def test_ema_follows_the_exponential_average_of_the_weights():
    from train.ema import AdapterEMA

    module = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    module.frozen = frozen
    start = module.weight.detach().clone()
    ema = AdapterEMA(module, decay=0.9)
    assert set(ema.shadow) == {"weight", "bias"}  # trainable only
    values = [torch.full_like(start, v) for v in (1.0, 2.0, -1.0)]
    expected = start.clone()
    for value in values:
        with torch.no_grad():
            module.weight.copy_(value)
        ema.update(module)
        expected = 0.9 * expected + 0.1 * value
    assert torch.allclose(ema.shadow["weight"], expected, atol=1e-7)
    restored = AdapterEMA(module, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        AdapterEMA(module, 1.0)
