"""``patch_model``: ConsistentID on a clone of a ComfyUI MODEL (Python API; the Apply node calls it).

Two parts, both through ComfyUI's own patch mechanisms so that ComfyUI loads, offloads and
unpatches everything:

* the LoRA of every attention layer (attn1 and attn2) merged into the UNet weights as weight
  patches (``W += lora_strength · up @ down``; the release LoRA has no alpha), nothing per step;
* an attn2 replacement per cross-attention layer that adds the decoupled ID branch
  (``id_attention.IDAttentionPatch``), keyed exactly by the adapter's processor slots.

Several calls on the same model compose: each adds its identity's branch to the layers' patches
(two people with masks), and the LoRA of one adapter file is merged only once per model (a second
call asking for another strength of it is refused). Other extensions' attn2 patches compose in
either order and at either key depth: ``id_attention`` hosts the Attn2Replace protocol of
IPAdapter_plus, InstantID and PuLID, and besides each layer's three-part key (which ComfyUI looks up
first) every block gets a ``BlockEntry`` under its two-part key, where such extensions look on SD1.5.
A ``calc_cond_batch`` wrapper gives every layer the roles, areas, sigma and model sampling of the
sampler call (``id_attention.CallContext``).
"""

from __future__ import annotations

import uuid

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.weight_adapter

from consistentid_core import ConsistentIDAdapter, ModelMismatch
from consistentid_core.base_models import release_files_hint

from .id_attention import BlockEntry, IDAttentionPatch, IdentityBranch, SigmaWindow, calc_cond_batch_wrapper

LORA_SOURCE_ATTRIBUTE = "consistentid_source"
WRAPPER_KEY = "consistentid"

ADAPTER_ID_ATTRIBUTE = "consistentid_id"


def adapter_id(adapter: ConsistentIDAdapter) -> str:
    """A stable id per loaded adapter object (tags its LoRA patches so they are merged once), kept on it."""
    if getattr(adapter, ADAPTER_ID_ATTRIBUTE, None) is None:
        setattr(adapter, ADAPTER_ID_ATTRIBUTE, uuid.uuid4().hex)
    return getattr(adapter, ADAPTER_ID_ATTRIBUTE)


def describe_model(model_patcher: comfy.model_patcher.ModelPatcher) -> str:
    """E.g. ``"SDXL (2048-d text context)"`` for messages."""
    base_model = model_patcher.model
    config = getattr(base_model, "model_config", None)
    name = type(config).__name__ if config is not None else type(base_model).__name__
    context_dim = getattr(config, "unet_config", {}).get("context_dim") if config is not None else None
    return f"{name} ({context_dim}-d text context)" if context_dim else name


def check_model(model_patcher: comfy.model_patcher.ModelPatcher, adapter: ConsistentIDAdapter) -> None:
    """Raise ModelMismatch unless every attention layer the adapter patches exists with its width."""
    diffusion_model = getattr(model_patcher.model, "diffusion_model", None)
    wanted = adapter.base_model_spec.display_name
    problem = None
    for slot, layer in adapter.cross_attention_layers():
        try:
            module = diffusion_model.get_submodule(slot.comfy_module)
            to_q, to_k = module.to_q.weight, module.to_k.weight
        except AttributeError:
            problem = f"it has no attention layer {slot.comfy_module}"
            break
        if to_k.shape[1] != adapter.cross_attention_dim:
            problem = f"its cross-attention takes a {to_k.shape[1]}-d text context, not {adapter.cross_attention_dim}-d"
            break
        if to_q.shape[0] != layer.hidden_size:
            problem = f"layer {slot.comfy_module} is {to_q.shape[0]} wide, the adapter's is {layer.hidden_size}"
            break
    if problem is not None:
        raise ModelMismatch(
            f"This ConsistentID model is for {wanted} checkpoints, but the MODEL is "
            f"{describe_model(model_patcher)}: {problem}. Use the ConsistentID file made for this "
            f"base model ({release_files_hint()})."
        )


def _merged_strength(model_patcher: comfy.model_patcher.ModelPatcher, key: str, source: str) -> float | None:
    """The strength this adapter's LoRA is already merged with on ``key``, None if it is not."""
    for patch in model_patcher.patches.get(key, []):
        if getattr(patch[1], LORA_SOURCE_ATTRIBUTE, None) == source:
            return float(patch[0])
    return None


def _offloaded(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ComfyUI's offload device: a view when it is there already, else a copy.

    Never a view of the adapter's accelerator memory, which would stay allocated after ComfyUI
    offloads the adapter; ComfyUI casts patches to the weight's device and dtype when patching.
    """
    tensor = tensor.detach()
    return tensor if tensor.device == torch.device(device) else tensor.to(device=device, copy=True)


def merge_lora(model_patcher: comfy.model_patcher.ModelPatcher, adapter: ConsistentIDAdapter, strength: float) -> None:
    """Add the adapter's LoRA deltas as weight patches (in place on ``model_patcher``, a clone).

    One adapter's LoRA is merged once per model: a second call with the same strength adds
    nothing, one with another strength raises ValueError (two identities of one adapter share its
    LoRA, so there is no right answer); strength 0 adds nothing.
    """
    if strength == 0.0:
        return
    source = adapter_id(adapter)
    pairs = list(adapter.lora_pairs())
    merged = _merged_strength(model_patcher, pairs[0][0], source)
    if merged is not None:
        if abs(merged - strength) > 1e-9:
            raise ValueError(
                f"this MODEL already carries this ConsistentID model's LoRA at lora_strength {merged:g} "
                f"(an earlier Apply ConsistentID); identities of one ConsistentID model share its LoRA, so give "
                f"every Apply the same lora_strength, or 0 on the later ones"
            )
        return
    offload = model_patcher.offload_device
    patches = {}
    for key, pair in pairs:
        lora = comfy.weight_adapter.LoRAAdapter(
            set(), (_offloaded(pair.up.weight, offload), _offloaded(pair.down.weight, offload), None, None, None, None)
        )
        setattr(lora, LORA_SOURCE_ATTRIBUTE, source)
        patches[key] = lora
    accepted = set(model_patcher.add_patches(patches, strength_patch=strength))
    missing = [key for key in patches if key not in accepted]
    if missing:
        raise ModelMismatch(
            f"The MODEL ({describe_model(model_patcher)}) has no weights for {len(missing)} of the "
            f"adapter's {len(patches)} LoRA targets, e.g. {missing[:3]}."
        )


def _prepare_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    mask = attn_mask.detach().float().cpu()
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 4 and mask.shape[-1] == 1:  # (B, H, W, 1)
        mask = mask[..., 0]
    if mask.dim() != 3:
        raise ValueError(f"attn_mask must be a MASK of shape (H, W) or (B, H, W), got {tuple(attn_mask.shape)}")
    return mask.clamp(0.0, 1.0)


def _stack_tokens(id_tokens: torch.Tensor, uncond_id_tokens: torch.Tensor) -> torch.Tensor:
    if id_tokens.dim() == 2:
        id_tokens = id_tokens[None]
    if uncond_id_tokens.dim() == 2:
        uncond_id_tokens = uncond_id_tokens[None]
    if id_tokens.shape[1:] != uncond_id_tokens.shape[1:]:
        raise ValueError(
            f"cond and uncond ID tokens differ in shape: {tuple(id_tokens.shape)} vs {tuple(uncond_id_tokens.shape)}"
        )
    if uncond_id_tokens.shape[0] != id_tokens.shape[0]:
        uncond_id_tokens = uncond_id_tokens[:1].expand_as(id_tokens)
    return torch.stack([id_tokens, uncond_id_tokens])


def patch_model(
    model_patcher: comfy.model_patcher.ModelPatcher,
    adapter: ConsistentIDAdapter,
    id_tokens: torch.Tensor,
    uncond_id_tokens: torch.Tensor,
    weight: float = 1.0,
    lora_strength: float = 1.0,
    start_at: float = 0.0,
    end_at: float = 1.0,
    attn_mask: torch.Tensor | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """Return a clone of ``model_patcher`` with the adapter's LoRA merged and its ID branch added.

    ``id_tokens``/``uncond_id_tokens``: ``(B, T, D)`` (or ``(T, D)``) from ``adapter.id_tokens``;
    B is 1 or the latent batch size. ``weight`` scales the ID branch (the original's ``scale``,
    1.0), ``lora_strength`` the merged LoRA. ``start_at``/``end_at`` (fractions of the denoising)
    bound the ID branch; they become sigmas when the sampler runs, under the model sampling in force
    then (a ModelSampling node after this call counts); a call without sigmas runs the branch.
    ``attn_mask`` (``(H, W)`` or ``(B, H, W)``, any resolution with the image's aspect ratio)
    confines the branch to a region. The input ``model_patcher`` is not modified.
    """
    check_model(model_patcher, adapter)
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"need 0 <= start_at <= end_at <= 1, got start_at={start_at}, end_at={end_at}")
    work = model_patcher.clone()
    merge_lora(work, adapter, lora_strength)
    _add_call_wrapper(work)

    # Resolved when the sampler runs, against the model sampling in force then (SigmaWindow).
    window = SigmaWindow(start_at, end_at, model_sampling=work.get_model_object("model_sampling"))
    mask = _prepare_mask(attn_mask)
    tokens = _stack_tokens(id_tokens, uncond_id_tokens)
    layers = list(adapter.cross_attention_layers())

    replace = work.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    blocks: dict[tuple[str, int], dict[int, IDAttentionPatch]] = {}
    with torch.no_grad():
        for slot, layer in layers:
            keys, values = layer.id_key_value(tokens.flatten(0, 1).to(adapter.device))
            shape = (2, tokens.shape[1], tokens.shape[2], keys.shape[-1])
            branch = IdentityBranch(
                keys=keys.reshape(shape).detach(),
                values=values.reshape(shape).detach(),
                weight=float(weight),
                mask=mask,
                window=window,
            )
            block, number, index = slot.patch_key
            previous = replace.get((block, number, index), replace.get((block, number)))
            if getattr(previous, "consistentid_block", False):
                previous = previous.layers.get(index)
            if getattr(previous, "consistentid_patch", False):
                patch = previous.with_branch(branch)
            else:
                patch = IDAttentionPatch((branch,), base=previous)
            work.set_model_attn2_replace(patch, block, number, index)
            blocks.setdefault((block, number), {})[index] = patch
    for (block, number), layer_patches in blocks.items():
        # Extensions that key a block (block, number) reach its layers through this entry.
        work.set_model_attn2_replace(BlockEntry(layer_patches), block, number)
    return work


def _add_call_wrapper(work: comfy.model_patcher.ModelPatcher) -> None:
    """Register the per-model-call wrapper once per model (several Applies share it)."""
    kind = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
    if WRAPPER_KEY not in work.wrappers.get(kind, {}):
        work.add_wrapper_with_key(kind, WRAPPER_KEY, calc_cond_batch_wrapper)
