"""The attn2 replacement that adds ConsistentID's ID branch to a ComfyUI UNet (IP-Adapter §3.2).

Per cross-attention layer ComfyUI hands the patch the projected ``q``, ``k``, ``v`` and
``extra_options``; the patch returns (pre-``to_out``)::

    out = text(q, k, v) + Σ_branches weight · mask ⊙ attention(q, K_ip, V_ip)  [+ hosted patches]

computed by ``consistentid_core.attention`` (the one ID-branch implementation), with ``text`` being
whatever ran before us (ComfyUI's own attention, or another extension's patch we wrap).
``K_ip``/``V_ip`` are precomputed per layer for the cond and uncond ID tokens, so nothing of the
adapter runs during sampling.

Sampler calls. The batch is made of chunks, one per conditioning of the sampler call
(``extra_options["cond_or_uncond"]`` holds their *positions* in the guider's list). The roles
Apply tagged on its conditioning (:data:`ROLE_KEY`) decide which tokens a chunk gets
(``consistentid_core.attention.chunk_rows``); a ``calc_cond_batch`` wrapper
(:func:`calc_cond_batch_wrapper`, registered by ``patch_model``) reads the tags, the sampler's
sigma and the model sampling in force once per model call and hands them to every layer in a
:class:`CallContext`, together with the area each conditioning crops the latent to.

Composition. Other identity extensions (IPAdapter_plus, InstantID, PuLID) call ``entry.add(callback,
**kwargs)`` on a layer's existing attn2 entry; :meth:`IDAttentionPatch.add` hosts such callbacks
with their own sigma windows. A clone gets its own patch objects (``__deepcopy__``), so an ``add``
on a clone never reaches the upstream MODEL.

This module has no ComfyUI import (the attention function is looked up when first needed, or
injected), so its logic is unit-tested without ComfyUI.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from consistentid_core.attention import (
    CALL_KEY,
    COND,
    UNCOND,
    IdentityTerm,
    add_identities,
    input_roles,
    layer_rows,
    select_chunks,
)

AttentionFn = Callable[..., torch.Tensor]

__all__ = ["COND", "UNCOND", "ROLE_KEY", "CALL_KEY", "CallContext", "SigmaWindow", "IdentityBranch", "IDAttentionPatch",
           "BlockEntry"]

ROLE_KEY = "consistentid_role"  # conditioning option: "positive" / "negative", set by Apply
PROTOCOL_NO_SIGMA = 999999999.9  # the sigma the Attn2Replace protocol assumes when the caller gives none


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's ``optimized_attention``, looked up at call time (other extensions may swap it)."""
    import comfy.ldm.modules.attention as comfy_attention_module

    return comfy_attention_module.optimized_attention(q, k, v, heads, **kwargs)


def current_sigma(extra_options: dict) -> float | None:
    """The sigma of this model call, or None when the caller did not say (then every branch runs).

    From the :class:`CallContext` when the sampler made one (no device sync), else read from
    ``extra_options["sigmas"]``.
    """
    call = extra_options.get(CALL_KEY)
    if call is not None and call.sigma is not None:
        return call.sigma
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    if isinstance(sigmas, torch.Tensor):
        return float(sigmas.detach().reshape(-1)[0].item())
    return float(sigmas[0] if isinstance(sigmas, (list, tuple)) else sigmas)


def block_size(extra_options: dict, sequence_length: int) -> tuple[int, int]:
    """(h, w) of the latent grid this attention layer works on."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[-2] * shape[-1] == sequence_length:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is not None and len(original) == 4:
        # Each UNet level halves (rounding up) the latent; find the level with this many tokens.
        h, w = int(original[-2]), int(original[-1])
        while h * w > sequence_length and h > 1 and w > 1:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == sequence_length:
            return h, w
    raise ValueError(
        f"cannot tell the latent size of an attention layer with {sequence_length} tokens "
        "(no activations_shape/original_shape in transformer_options); an attention mask needs it"
    )


# --- one model call ---------------------------------------------------------------------------------

Area = tuple[int, int, int, int]  # (y, x, h, w) in latent cells


@dataclasses.dataclass
class CallContext:
    """What every layer of one model call needs from the sampler, worked out once.

    ``roles``: the role of each conditioning (by the uuid ComfyUI gives it) from the tags Apply set;
    ``areas``: the crop of the latent each area conditioning runs on; ``latent_size``: the full
    latent (h, w); ``sigma``: this call's sigma as a float; ``model_sampling``: the model sampling in
    force, against which ``start_at``/``end_at`` are resolved.
    """

    timestep: torch.Tensor | None = None
    model_sampling: Any = None
    roles: dict = dataclasses.field(default_factory=dict)
    areas: dict = dataclasses.field(default_factory=dict)
    latent_size: tuple[int, int] | None = None
    latent_dims: int = 4
    _sigma: float | None = dataclasses.field(default=None, repr=False)

    @property
    def sigma(self) -> float | None:
        """This call's sigma as a float, read from the device once per call and only if asked."""
        if self._sigma is None and self.timestep is not None:
            self._sigma = float(self.timestep.detach().reshape(-1)[0].item())
        return self._sigma

    @classmethod
    def for_call(cls, model: Any, conds: Sequence[Sequence[dict] | None], x_in: torch.Tensor, timestep: torch.Tensor) -> "CallContext":
        entries = [list(cond or []) for cond in conds]
        roles = input_roles([[entry.get(ROLE_KEY) for entry in cond] for cond in entries])
        context = cls(
            timestep=timestep,
            model_sampling=getattr(model, "model_sampling", None),
            latent_size=(int(x_in.shape[-2]), int(x_in.shape[-1])),
        )
        for cond, cond_roles in zip(entries, roles):
            for entry, role in zip(cond, cond_roles):
                uid = entry.get("uuid")
                if uid is None:
                    continue
                context.roles[uid] = role
                if entry.get("area") is not None:
                    context.areas[uid] = tuple(entry["area"])
        context.latent_dims = x_in.dim()
        return context

    def chunk_roles(self, extra_options: dict) -> list[str | None] | None:
        uuids = extra_options.get("uuids")
        if not uuids:
            return None
        return [self.roles.get(uid) for uid in uuids]

    def chunk_areas(self, extra_options: dict, chunks: int) -> list[Area | None]:
        """The crop of each chunk, clipped as the sampler clips it (asked only when a mask needs it)."""
        uuids = extra_options.get("uuids") or [None] * chunks
        return [None if self.areas.get(uid) is None else clipped_area(self.areas[uid], self.latent_size, self.latent_dims)
                for uid in uuids]


def clipped_area(area: Sequence, latent_size: tuple[int, int], latent_dims: int) -> Area:
    """A conditioning's ``area`` (h, w, y, x in latent cells) clipped to the latent, as the sampler crops it."""
    if latent_dims != 4 or len(area) != 4 or isinstance(area[0], str):
        raise ValueError(
            f"ConsistentID's attention mask cannot follow the area {tuple(area)} on a {latent_dims - 2}-d latent; "
            "use area conditioning only on image latents, or leave attn_mask empty"
        )
    h, w, y, x = (int(value) for value in area)
    return y, x, max(0, min(latent_size[0] - y, h)), max(0, min(latent_size[1] - x, w))


def calc_cond_batch_wrapper(executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                            model_options: dict) -> Any:
    """ComfyUI ``CALC_COND_BATCH`` wrapper: one :class:`CallContext` per model call, for every layer."""
    transformer_options = {**model_options.get("transformer_options", {}),
                           CALL_KEY: CallContext.for_call(model, conds, x_in, timestep)}
    return executor(model, conds, x_in, timestep, {**model_options, "transformer_options": transformer_options})


# --- when a branch runs -----------------------------------------------------------------------------


class SigmaWindow:
    """The part of the denoising in which a branch runs, shared by all layers of one Apply.

    ``start_at``/``end_at`` are fractions of the denoising, resolved to sigmas against the model
    sampling in force when the sampler runs (as ComfyUI resolves conditioning percents), so a
    ModelSampling node placed after Apply moves the window with the schedule. ``sigmas`` gives fixed
    bounds instead. The test runs once per model call: its result is kept for the call's
    ``sigmas`` tensor, which every layer of the call shares.
    """

    def __init__(self, start_at: float = 0.0, end_at: float = 1.0, model_sampling: Any = None,
                 sigmas: tuple[float, float] | None = None) -> None:
        self.start_at, self.end_at = float(start_at), float(end_at)
        self.fixed = None if sigmas is None else (float(sigmas[0]), float(sigmas[1]))
        self._default_sampling = model_sampling  # for calls outside a sampler (small: a schedule table)
        self._bounds: tuple[Any, tuple[float, float]] | None = None
        self._memo: tuple[Any, bool] | None = None

    @property
    def always(self) -> bool:
        if self.fixed is not None:
            return self.fixed[0] == float("inf") and self.fixed[1] <= 0.0
        return self.start_at <= 0.0 and self.end_at >= 1.0

    def bounds(self, model_sampling: Any) -> tuple[float, float]:
        """(sigma_start, sigma_end) under ``model_sampling`` (cached per model sampling object)."""
        if self.fixed is not None:
            return self.fixed
        if model_sampling is None:
            model_sampling = self._default_sampling
        if model_sampling is None:
            return float("inf"), 0.0
        if self._bounds is None or self._bounds[0]() is not model_sampling:
            bounds = (float(model_sampling.percent_to_sigma(self.start_at)), float(model_sampling.percent_to_sigma(self.end_at)))
            self._bounds = (_weak(model_sampling), bounds)
        return self._bounds[1]

    def is_active(self, extra_options: dict) -> bool:
        if self.always:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        if self._memo is not None and self._memo[0] is sigmas:
            return self._memo[1]
        sigma = current_sigma(extra_options)
        call = extra_options.get(CALL_KEY)
        sigma_start, sigma_end = self.bounds(call.model_sampling if call is not None else None)
        active = sigma is None or sigma_end <= sigma <= sigma_start
        self._memo = (sigmas, active)
        return active

    def __deepcopy__(self, memo: dict) -> "SigmaWindow":
        return self  # immutable settings; the caches are keyed by what they cache


def _weak(obj: Any) -> Callable[[], Any] | None:
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


# --- one identity on one layer ----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class IdentityBranch:
    """One identity's ID branch on one cross-attention layer.

    ``keys``/``values``: ``(2, N, T, C)``, row 0 from the cond ID tokens, row 1 from the uncond ones
    (N = 1, or one set of tokens per sample). ``window``: when it runs (shared by the layers of one
    Apply); without one, fixed bounds ``sigma_end <= sigma <= sigma_start``.
    ``mask``: optional ``(M, H, W)`` in [0, 1] over the whole image, resized to each layer's grid
    (and cropped to a conditioning's area first).
    """

    keys: torch.Tensor
    values: torch.Tensor
    weight: float = 1.0
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None
    window: SigmaWindow | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.window is None:
            self.window = SigmaWindow(sigmas=(self.sigma_start, self.sigma_end))

    def is_active(self, extra_options: dict) -> bool:
        return self.weight != 0.0 and self.window.is_active(extra_options)

    def batch_key_values(
        self, rows: Sequence[int], batch: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K_ip, V_ip for a batch of ``len(rows)`` chunks of ``batch`` samples (cached per layout)."""
        cache_key = ("kv", tuple(rows), batch, device, dtype)
        if cache_key not in self._cache:
            keys = self.keys.to(device=device, dtype=dtype)
            values = self.values.to(device=device, dtype=dtype)
            self._cache[cache_key] = (select_chunks(keys, rows, batch), select_chunks(values, rows, batch))
        return self._cache[cache_key]

    def batch_mask(
        self, areas: Sequence[Area | None], batch: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype,
        latent_size: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """``(chunks · batch, h · w, 1)`` mask on a ``size`` layer grid, one chunk per entry of ``areas``."""
        if self.mask is None:
            return None
        cache_key = ("mask", tuple(areas), batch, size, latent_size, device, dtype)
        if cache_key not in self._cache:
            parts = [select_chunks(self._grid_mask(area, size, latent_size, device, dtype)[None], [0], batch) for area in areas]
            self._cache[cache_key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._cache[cache_key]

    def _grid_mask(self, area: Area | None, size: tuple[int, int], latent_size: tuple[int, int] | None,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        mask = self.mask[:, None].float()
        if area is not None:
            # The chunk sees only its area of the latent: crop the mask there, then fit it to the grid.
            y, x, h, w = area
            mask = F.interpolate(mask, size=latent_size, mode="bilinear", align_corners=False)[..., y:y + h, x:x + w]
        resized = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        return resized.reshape(resized.shape[0], -1, 1).to(device=device, dtype=dtype)


# --- the patch --------------------------------------------------------------------------------------


class IDAttentionPatch:
    """attn2 replace patch: the text attention (or a wrapped earlier patch), ID branches, hosted patches.

    A second identity on the same layer makes a new patch via :meth:`with_branch`. Other extensions'
    callbacks arrive through :meth:`add` (the Attn2Replace protocol of IPAdapter_plus, InstantID and
    PuLID). ComfyUI deep-copies ``model_options`` on every clone: the copy shares the branches
    (immutable tensors) but has its own list of hosted callbacks, so an ``add`` on a clone stays there.
    """

    consistentid_patch = True  # duck-typed marker: the class may be loaded under several module names

    def __init__(
        self,
        branches: Sequence[IdentityBranch],
        base: Callable[..., torch.Tensor] | None = None,
        attention: AttentionFn | None = None,
        hosted: Sequence[tuple[Callable[..., torch.Tensor], dict]] = (),
    ) -> None:
        self.branches = tuple(branches)
        self.base = base
        self.attention = attention or comfy_attention
        self.hosted = list(hosted)

    def with_branch(self, branch: IdentityBranch) -> "IDAttentionPatch":
        return IDAttentionPatch(self.branches + (branch,), base=self.base, attention=self.attention, hosted=self.hosted)

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        """Host another extension's attn2 callback (their ``Attn2Replace.add``).

        It runs after our branches as in their own patch: ``out += callback(out, q, k, v,
        extra_options, **kwargs)`` while ``kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]``.
        Their patch also copies the kwargs onto itself as attributes; we do not (they would
        overwrite ours), and nothing in those extensions reads them back.
        """
        for name in ("sigma_start", "sigma_end"):
            if name not in kwargs:
                raise ValueError(f"an attn2 callback added to ConsistentID's patch needs {name} (Attn2Replace protocol)")
        self.hosted.append((callback, kwargs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Exactly the call ComfyUI's CrossAttention makes, so an inactive branch changes nothing.
            return self.attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)

        out = self.base(q, k, v, extra_options) if self.base is not None else attend(q, k, v)
        active = [branch for branch in self.branches if branch.is_active(extra_options)]
        if active:
            out = add_identities(out, q, self._terms(active, q, extra_options), attend)
        if self.hosted:
            out = self._run_hosted(out, q, k, v, extra_options)
        return out

    def _terms(self, active: Sequence[IdentityBranch], q: torch.Tensor, extra_options: dict) -> list[IdentityTerm]:
        rows = layer_rows(extra_options)
        chunks = len(rows)
        if q.shape[0] % chunks:
            raise ValueError(f"batch of {q.shape[0]} does not split into {chunks} cond/uncond chunks")
        batch = q.shape[0] // chunks
        terms = []
        for branch in active:
            keys, values = branch.batch_key_values(rows, batch, q.device, q.dtype)
            mask = None
            if branch.mask is not None:
                call = extra_options.get(CALL_KEY)
                areas = call.chunk_areas(extra_options, chunks) if call is not None else [None] * chunks
                size = block_size(extra_options, q.shape[1])
                latent_size = call.latent_size if call is not None else None
                mask = branch.batch_mask(areas, batch, size, q.device, q.dtype, latent_size)
            terms.append(IdentityTerm(keys, values, branch.weight, mask))
        return terms

    def _run_hosted(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        sigma = current_sigma(extra_options)
        sigma = PROTOCOL_NO_SIGMA if sigma is None else sigma
        dtype = q.dtype
        for callback, kwargs in self.hosted:
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype=dtype)

    # ComfyUI moves patch objects with .to(device) / .to(dtype) and stores the result; tensors are
    # converted lazily to q's device and dtype instead, so a move is a no-op.
    def to(self, *args: Any, **kwargs: Any) -> "IDAttentionPatch":
        if self.base is not None and hasattr(self.base, "to"):
            moved = self.base.to(*args, **kwargs)
            if moved is not None and moved is not self.base:
                return IDAttentionPatch(self.branches, base=moved, attention=self.attention, hosted=self.hosted)
        return self

    def models(self) -> list:
        return list(self.base.models()) if self.base is not None and hasattr(self.base, "models") else []

    def __deepcopy__(self, memo: dict) -> "IDAttentionPatch":
        # Branches are immutable and shared; the wrapped patch is copied with the rest of the
        # model_options (the memo keeps it the same object as wherever else it is registered).
        return IDAttentionPatch(
            self.branches,
            base=copy.deepcopy(self.base, memo),
            attention=self.attention,
            hosted=[(callback, dict(kwargs)) for callback, kwargs in self.hosted],
        )


class BlockEntry:
    """Our entry under a block's two-part key ``(block, number)``, over the block's layer patches.

    ComfyUI looks a layer up by ``(block, number, index)`` first, so an extension that keys the
    block ``(block, number)`` (IPAdapter_plus on SD1.5) would never run once our three-part entries
    exist. With this entry there, its ``add`` reaches every layer of the block instead. ComfyUI does
    not call it while the layers' own entries exist; if called, it dispatches by ``block_index``.
    """

    consistentid_block = True

    def __init__(self, layers: dict[int, IDAttentionPatch]) -> None:
        self.layers = dict(layers)

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        for patch in self.layers.values():
            patch.add(callback, **kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return self.layers[extra_options.get("block_index", 0)](q, k, v, extra_options)

    def to(self, *args: Any, **kwargs: Any) -> "BlockEntry":
        return self  # the layers are moved under their own keys

    def models(self) -> list:
        return []

    def __deepcopy__(self, memo: dict) -> "BlockEntry":
        # Through the memo: the copies are the very objects the copied three-part keys hold.
        return BlockEntry({index: copy.deepcopy(patch, memo) for index, patch in self.layers.items()})
