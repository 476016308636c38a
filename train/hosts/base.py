"""What the trainer needs from a base model: frozen encoders, a UNet that takes attention patches.

The one implementation is :class:`train.hosts.comfy.ComfyHost`: a ComfyUI single-file checkpoint,
ComfyUI's UNet, VAE, text encoder and CLIP vision. The interface keeps the training step
independent of how ComfyUI is driven; tests run it on tiny checkpoints in the real formats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..attention_patch import PatchPlan


class Host(ABC):
    """A frozen base model. Tensors go in and come out on ``self.device``."""

    base_model: str  # "sd15" or "sdxl"
    device: torch.device
    tokenizer: Any  # transformers CLIPTokenizer (CLIP-L) for the facial prompt
    adapter_dims: dict[str, Any]  # ConsistentIDAdapter.create(...) keyword arguments matching this UNet

    @property
    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 cumulative ᾱ of the base model's training schedule."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled latents (the UNet's input space)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → (B, 3, H, W) images in [0, 1]."""

    @abstractmethod
    def encode_text(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids of a batch → (context (B, 77, D), pooled or None)."""

    @abstractmethod
    def clip_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP pixels (N, 3, 224, 224) → penultimate hidden states (N, L, E)."""

    @abstractmethod
    def install(self, plan: PatchPlan) -> None:
        """Register the attention patches and LoRA weight wrappers on the UNet."""

    @abstractmethod
    def predict_noise(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """ε prediction of the patched UNet; ``conditioning`` carries pooled text and sizes (SDXL)."""

    @abstractmethod
    def base_weights(self) -> dict[str, torch.Tensor]:
        """ComfyUI-keyed UNet weights (``diffusion_model.…``), for initialising the ID key/value."""

    def uncond_text_ids(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Ids of the empty prompt (classifier-free guidance in sample grids)."""
        encoded = self.tokenizer("", max_length=77, padding="max_length", truncation=True)["input_ids"]
        ids = torch.tensor([encoded] * batch_size, dtype=torch.long, device=self.device)
        return {"input_ids": ids, "text_only_input_ids": ids}


def checkpoint_forward(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
    import torch.utils.checkpoint

    if getattr(module, "_consistentid_checkpointed", False):
        return
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The UNet keeps writing the current block into its shared transformer_options dict; the
        # recomputation must see the values of *this* call (the patch lookup depends on them).
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
    module._consistentid_checkpointed = True
