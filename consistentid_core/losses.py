"""Training losses of ConsistentID (paper §3.3, eq. 6-7), written from the formulas.

* **Noise prediction** (eq. 6): ``MSE(ε_pred, ε)``; with probability ``mask_loss_prob`` the trainer
  multiplies both by the "without background" mask first (the original's ``background_loss``
  branch), so the loss then only sees the person.
* **Facial attention localization** (eq. 7): for every facial token ``k`` with region mask ``M_k``
  and text-attention map ``A_k`` (one value per latent position, per head), after scaling ``A_k``
  to a maximum of 1::

      L_k = mean(A_k over 1 − M_k) − mean(A_k over M_k)          # the "balanced L1" of FastComposer

  averaged over the valid tokens of a sample, then over samples and heads, then over the captured
  layers. It is lowest (about −1) when a token attends only inside its region.

Defects of the original (``functions.py``) not reproduced: the loss divided by the number of
captured layers even when none was captured (it captured none with xformers installed); it assumed
square latents (``int(N ** 0.5)``); and it was wired to self-attention (see
:func:`localization_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .checkpoint.layout import ProcessorSlot

#: The original's attention groups (``unet_store_cross_attention_scores``): the diffusers blocks of
#: SD1.5 that hold attention, in UNet order. The localization loss uses the middle ``n`` of them.
LOCALIZATION_GROUPS = (
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "mid_block",
    "up_blocks.1",
    "up_blocks.2",
    "up_blocks.3",
)

#: Added to sums that may be empty, as the original (``BalancedL1Loss`` and the per-sample token count).
EPS = 1e-5


def localization_slots(
    slots: Iterable[ProcessorSlot], num_groups: int = 5, attn: str = "attn2"
) -> list[ProcessorSlot]:
    """The attention layers whose maps feed the localization loss.

    The middle ``num_groups`` of :data:`LOCALIZATION_GROUPS` (5 for SD1.5 and 3 for SDXL in the
    original trainers), layers of kind ``attn``. The paper's loss is on **cross-attention**
    (``attn2``) maps of the facial tokens. The original hooked the self-attention layers
    (``attn1``), gathering latent-to-latent probabilities at the token positions: keep
    ``attn="attn1"`` only to reproduce that behaviour.
    """
    if attn not in ("attn1", "attn2"):
        raise ValueError(f"attn must be 'attn1' or 'attn2', got {attn!r}")
    if not 1 <= num_groups <= len(LOCALIZATION_GROUPS):
        raise ValueError(f"num_groups must be between 1 and {len(LOCALIZATION_GROUPS)}, got {num_groups}")
    start = (len(LOCALIZATION_GROUPS) - num_groups) // 2
    groups = tuple(group + "." for group in LOCALIZATION_GROUPS[start : start + num_groups])
    return [slot for slot in slots if slot.attn == attn and slot.diffusers_name.startswith(groups)]


def balanced_l1(token_probs: torch.Tensor, region_masks: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean attention outside the region minus mean attention inside it, over positions.

    ``token_probs`` and ``region_masks`` broadcast to ``(..., N, K)`` (N latent positions, K tokens);
    returns ``(..., K)``. ``normalize`` first divides each map by its maximum over positions
    (``BalancedL1Loss(normalize=True)``, what the original trainer used).
    """
    token_probs = token_probs.float()
    region_masks = region_masks.float()
    if normalize:
        token_probs = token_probs / (token_probs.amax(dim=-2, keepdim=True) + EPS)
    background = 1.0 - region_masks
    outside = (token_probs * background).sum(dim=-2) / (background.sum(dim=-2) + EPS)
    inside = (token_probs * region_masks).sum(dim=-2) / (region_masks.sum(dim=-2) + EPS)
    return outside - inside


def resize_region_masks(region_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, K, H, W)`` masks → ``(B, K, h·w)`` at a layer's resolution (bilinear, antialiased)."""
    resized = F.interpolate(region_masks.float(), size=size, mode="bilinear", antialias=True)
    return resized.flatten(2)


def localization_loss_one_layer(
    token_probs: torch.Tensor,
    region_masks: torch.Tensor,
    token_valid: torch.Tensor,
    spatial_size: tuple[int, int],
) -> torch.Tensor:
    """Localization loss of one attention layer.

    ``token_probs``: ``(B, heads, N, K)`` attention probabilities of the K facial token slots at the
    layer's N = h·w latent positions; ``region_masks``: ``(B, K, H, W)`` in 0..1, slot-aligned;
    ``token_valid``: ``(B, K)`` which slots hold a facial token; ``spatial_size``: ``(h, w)``.
    """
    batch, _, positions, slots = token_probs.shape
    height, width = spatial_size
    if height * width != positions:
        raise ValueError(f"attention maps have {positions} positions, but the layer is {height}x{width}")
    if region_masks.shape[:2] != (batch, slots) or token_valid.shape != (batch, slots):
        raise ValueError(
            f"shapes disagree: probs {tuple(token_probs.shape)}, masks {tuple(region_masks.shape)}, "
            f"valid {tuple(token_valid.shape)}"
        )
    masks = resize_region_masks(region_masks.to(token_probs.device), spatial_size)  # (B, K, N)
    per_token = balanced_l1(token_probs, masks.transpose(1, 2).unsqueeze(1))  # (B, heads, K)
    valid = token_valid.to(device=per_token.device, dtype=per_token.dtype).unsqueeze(1)
    per_sample = (per_token * valid).sum(dim=2) / (valid.sum(dim=2) + EPS)  # (B, heads)
    return per_sample.mean()


def facial_localization_loss(
    layers: Sequence[tuple[torch.Tensor, tuple[int, int]]],
    region_masks: torch.Tensor,
    token_valid: torch.Tensor,
) -> torch.Tensor:
    """Average of :func:`localization_loss_one_layer` over the captured ``(probs, (h, w))`` layers."""
    if not layers:
        raise ValueError(
            "no attention maps were captured for the localization loss; check that the localization "
            "layers exist in this UNet and that the attention patches are installed"
        )
    total = sum(localization_loss_one_layer(probs, region_masks, token_valid, size) for probs, size in layers)
    return total / len(layers)


def masked_noise_mse(
    prediction: torch.Tensor, target: torch.Tensor, foreground_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Noise-prediction MSE in float32, optionally with the background masked out.

    ``foreground_mask`` ``(B, 1, H, W)`` in 0..1 (the "without background" mask, image resolution) is
    resized bilinearly to the latent size and multiplies prediction and target; the mean still runs
    over every element, as in the original.
    """
    if foreground_mask is not None:
        mask = F.interpolate(
            foreground_mask.float().to(prediction.device),
            size=prediction.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        prediction = prediction.float() * mask
        target = target.float() * mask
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
