"""Benchmarks: ConsistentID in ComfyUI against the original design, as side-by-side ratios.

``python -m bench`` runs everything (see ``docs/PERFORMANCE.md``); ``python -m bench step face``
runs a selection, ``--smoke`` uses tiny models. The pure helpers (``stats``, ``report``) import
neither torch nor ComfyUI, so CI unit-tests them anywhere.
"""
