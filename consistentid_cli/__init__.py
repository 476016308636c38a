"""Command line tools of ComfyUI-ConsistentID: ``python -m consistentid_cli doctor|run`` (docs/CLI.md).

Kept apart from the ComfyUI package entry point (``__init__.py`` at the repository root) and from
``consistentid_core``: nothing here is imported when ComfyUI loads the nodes.
"""
