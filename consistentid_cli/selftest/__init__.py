"""``python -m consistentid_cli selftest``: the product's main job, end to end, on tiny models.

The builders here make small random models in the exact release formats; the self-test and the
test suite share them. ``tiny_adapter`` and ``tiny_insightface`` need only torch (and onnx);
``tiny_comfy_models`` and ``command`` import ComfyUI and are imported only after it is booted.
"""
