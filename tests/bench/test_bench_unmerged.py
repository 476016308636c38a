"""bench.unmerged: the original's run-time LoRA and ID projections compute what merging computes."""

import torch
from torch import nn

from bench.models import TINY_ADAPTER, build_adapter, init_module, module_bytes
from bench.unmerged import RuntimeIDAttention, RuntimeLoRALinear, apply_runtime_lora
from consistentid_core.attention import attention, decoupled_cross_attention


class _Attention(nn.Module):
    """The projections of a ComfyUI CrossAttention (to_out is Linear + Dropout)."""

    def __init__(self, width: int, context: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(context, width, bias=False)
        self.to_v = nn.Linear(context, width, bias=False)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(0.0))


def _unet_stub(adapter) -> nn.Module:
    """Empty modules at every path the adapter's slots name, each holding one attention layer."""
    root = nn.Module()
    for slot, layer in zip(adapter.slots, adapter.layers):
        *parents, leaf = slot.comfy_module.split(".")
        owner = root
        for name in parents:
            if not hasattr(owner, name):
                owner.add_module(name, nn.Module())
            owner = getattr(owner, name)
        context = layer.cross_attention_dim or layer.hidden_size
        owner.add_module(leaf, _Attention(layer.hidden_size, context))
    return init_module(root, seed=0)


def test_runtime_lora_equals_the_merged_weight():
    """base(x) + up(down(x)) == x @ (W + up @ down)ᵀ + b: merging is exact (no alpha)."""
    adapter = build_adapter(TINY_ADAPTER)
    pair = adapter.layers[0].lora("to_q")
    base = init_module(nn.Linear(32, 32), seed=1)
    x = torch.randn(2, 5, 32)
    merged = nn.functional.linear(x, base.weight + pair.delta_weight(), base.bias)
    assert torch.allclose(RuntimeLoRALinear(base, pair)(x), merged, atol=1e-5)


def test_apply_runtime_lora_wraps_q_k_v_out_of_every_layer():
    adapter = build_adapter(TINY_ADAPTER)
    stub = _unet_stub(adapter)
    assert apply_runtime_lora(stub, adapter) == 4 * len(adapter.layers)
    for slot in adapter.slots:
        attention_module = stub.get_submodule(slot.comfy_module)
        for linear in (attention_module.to_q, attention_module.to_k, attention_module.to_v, attention_module.to_out[0]):
            assert isinstance(linear, RuntimeLoRALinear)


def test_runtime_id_attention_matches_decoupled_attention_per_chunk():
    """Uncond chunk first (as ComfyUI batches): each chunk attends to its own ID keys/values."""
    adapter = build_adapter(TINY_ADAPTER)
    slot, layer = next(adapter.cross_attention_layers())
    tokens = torch.randn(2, adapter.num_tokens, adapter.cross_attention_dim)
    width, heads = layer.hidden_size, 4
    q, k, v = torch.randn(2, 16, width), torch.randn(2, 7, width), torch.randn(2, 7, width)

    def attention_fn(q, k, v, heads, **_):
        return attention(q, k, v, heads)

    patch = RuntimeIDAttention(layer, tokens, attention_fn, scale=0.8)
    out = patch(q, k, v, {"n_heads": heads, "cond_or_uncond": [1, 0]})
    with torch.no_grad():
        k_ip, v_ip = layer.id_key_value(tokens[[1, 0]])
    expected = decoupled_cross_attention(q, k, v, k_ip, v_ip, heads, ip_scale=0.8)
    assert torch.allclose(out, expected, atol=1e-5)
    assert patch.to("cpu") is patch


def test_init_module_initialises_layers_whose_reset_is_disabled():
    """ComfyUI's ops make reset_parameters a no-op; init_module still fills every weight."""

    class NoInitLinear(nn.Linear):
        def reset_parameters(self):
            return None

    layer = NoInitLinear(64, 64)
    nn.init.zeros_(layer.weight)
    init_module(layer, seed=0)
    assert layer.weight.abs().max() > 0
    assert layer.weight.abs().max() <= 64 ** -0.5 + 1e-6  # Kaiming-uniform bound 1/sqrt(fan_in)


def test_module_bytes_per_dtype():
    layer = nn.Linear(10, 10)  # 110 parameters
    assert module_bytes(layer) == 440
    assert module_bytes(layer, torch.float16) == 220
