"""Face captions from a local vision-language model, with the built-in template as the fallback.

The original captioned its training faces with LLaVA-1.5 and the instruction
:data:`FACE_INSTRUCTION` (``data/FGID_caption.py``, greedy decoding: temperature 0, one beam); its
inference pipelines ship the call disabled and use the template caption instead
(``reference-semantics.md`` §20). Here any transformers *image-text-to-text* model in a local
folder works (LLaVA-1.5 matches the training captions best); nothing is ever downloaded
(``local_files_only=True``, no remote code).

Models live in ComfyUI's ``models/LLM/<name>/`` (:data:`VLM_FOLDER`), the folder other captioning
nodes (Florence-2, JoyCaption) already use, as a Hugging Face model folder: ``config.json``,
weights, tokenizer and processor files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consistentid_core.checkpoint.io import load_error_reason
from consistentid_core.errors import CheckpointFormatError, MissingModelError, ModelMismatch
from consistentid_core.prompt.assembly import DEFAULT_FACE_CAPTION, MAX_FACE_CAPTION_CHARS

__all__ = [
    "FACE_INSTRUCTION", "VLM_FOLDER", "FaceCaptioner", "clean_caption", "describe_face", "vlm_folder_problem",
]

logger = logging.getLogger(__name__)

FACE_INSTRUCTION = "Describe this person's facial features for me, including face, ears, eyes, nose, and mouth."
"""The original's face-detail instruction (``data/FGID_caption.py`` prompt2, whitespace normalised)."""

VLM_FOLDER = "LLM"
VLM_EXAMPLE = "llava-hf/llava-1.5-7b-hf"
DEFAULT_MAX_NEW_TOKENS = 160  # ~600 characters, well past what the caption may keep (330)
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Characters ComfyUI's prompt syntax (weights, embeddings, wildcards) or our markers would interpret.
_SPECIAL_CHARACTERS = re.compile(r"[()\[\]{}<>|\\*_#`]")
_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|gpt|answer)\s*[:\n]\s*", re.IGNORECASE)
_LIST_MARKER = re.compile(r"(?m)^\s*(?:[-•]|\d+[.)])(?=\s|$)")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _download_hint(folder: Path) -> str:
    return (f"Put a Hugging Face image-text-to-text model folder there, e.g. `huggingface-cli download {VLM_EXAMPLE} "
            f"--local-dir {folder}`; or use the template caption")


def vlm_folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a usable local model folder (None when it looks complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    if not (folder / "config.json").is_file():
        nested = next((p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "config.json").is_file()), None)
        if nested is not None:
            return f"{folder} holds the model one folder too deep ({nested.name}/config.json): move the files up"
        if (folder / "snapshots").is_dir():
            return f"{folder} is a Hugging Face cache entry; download with --local-dir instead (plain files)"
        return f"{folder} has no config.json (not a Hugging Face model folder)"
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        return f"{folder} has config.json but no weights (*.safetensors)"
    if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
        return f"{folder} has no processor_config.json / preprocessor_config.json (image processor)"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return f"{folder} has no tokenizer files"
    return None


def clean_caption(text: str, max_chars: int = MAX_FACE_CAPTION_CHARS, instruction: str = FACE_INSTRUCTION) -> str:
    """A model's answer as one plain paragraph the facial prompt can use.

    Drops an echoed instruction or role prefix, list and markdown markup and the characters
    ComfyUI's prompt syntax would read as weights; keeps whole sentences up to ``max_chars`` (the
    original drops the facial tokens for captions over 330 characters) and drops a sentence cut
    off by the token limit. Returns "" when nothing usable is left.
    """
    text = text.strip()
    if text.lower().startswith(instruction.lower()):
        text = text[len(instruction):]
    text = _ROLE_PREFIX.sub("", text)
    text = _LIST_MARKER.sub(" ", text)
    text = _SPECIAL_CHARACTERS.sub("", text)
    text = re.sub(r"\s+", " ", text).strip(" ,;:")
    if not any(character.isalnum() for character in text):
        return ""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if text and ends and ends[-1] != len(text):
        text = text[: ends[-1]]  # the last sentence was cut off by max_new_tokens
    if len(text) > max_chars:
        fitting = [end for end in ends if end <= max_chars]
        text = text[: fitting[-1]] if fitting else text[:max_chars].rsplit(" ", 1)[0].rstrip(" ,;:") + "."
    if text and text[-1] not in ".!?":
        text += "."
    return text.strip()


class FaceCaptioner:
    """A loaded image-text-to-text model and its processor (greedy decoding, like the original)."""

    def __init__(self, model: Any, processor: Any, name: str = "model") -> None:
        self.model, self.processor, self.name = model, processor, name

    @classmethod
    def load(cls, folder: str | Path, device: Any = None, dtype: Any = None) -> FaceCaptioner:
        """Load from a local folder only; MissingModelError / ModelMismatch say what is wrong."""
        folder = Path(folder)
        problem = vlm_folder_problem(folder)
        if problem:
            raise MissingModelError(f"Vision-language model not usable: {problem}. Expected models/{VLM_FOLDER}/"
                                    f"{folder.name}/ ({folder}). {_download_hint(folder)}.")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            model = AutoModelForImageTextToText.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, dtype=dtype
            )
        except Exception as error:  # transformers, torch and safetensors raise many types for a bad folder
            message = str(error)
            if isinstance(error, ValueError) and ("trust_remote_code" in message or "Unrecognized" in message):
                raise ModelMismatch(
                    f"{folder.name} is not an image-text-to-text model transformers can load without remote code; "
                    f"use e.g. {VLM_EXAMPLE} or a Qwen2-VL model."
                ) from error
            reason = load_error_reason(error)
            what = f"a weights file in it {reason[3:]}" if reason else "transformers could not load it (incomplete folder)"
            raise CheckpointFormatError(
                f"{folder.name} is not a usable vision-language model: {what}; "
                f"download the model folder again (e.g. `huggingface-cli download {VLM_EXAMPLE} --local-dir {folder}`)."
            ) from error
        return cls(model.to(device or "cpu").eval(), processor, folder.name)

    def _inputs(self, image: Any, instruction: str) -> Any:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]}]
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        image_token = getattr(self.processor, "image_token", "<image>")
        prompt = f"USER: {image_token}\n{instruction} ASSISTANT:"  # LLaVA-1.5's conversation format
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def generate(
        self,
        image: Any,
        instruction: str = FACE_INSTRUCTION,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """The model's raw answer for one RGB image (PIL, array or tensor in any layout to_rgb_uint8 takes).

        ``progress(tokens_done, max_new_tokens)`` is called after every generated token (a
        ComfyUI progress bar, which also lets the user cancel).
        """
        import torch
        from PIL import Image
        from transformers import StoppingCriteria, StoppingCriteriaList

        from consistentid_core.face.images import to_rgb_uint8

        pil = Image.fromarray(to_rgb_uint8(image))
        inputs = self._inputs(pil, instruction).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_length = inputs["input_ids"].shape[1]

        class _Report(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                if progress is not None:
                    progress(input_ids.shape[1] - prompt_length, max_new_tokens)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                stopping_criteria=StoppingCriteriaList([_Report()]),
            )
        new_tokens = output[:, prompt_length:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]

    def describe(self, image: Any, instruction: str = FACE_INSTRUCTION, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 progress: Callable[[int, int], None] | None = None) -> str:
        """A cleaned caption (see :func:`clean_caption`); "" when the answer had nothing usable."""
        return clean_caption(self.generate(image, instruction, max_new_tokens, progress), instruction=instruction)


def describe_face(image: Any, captioner: FaceCaptioner | None = None, template: str = DEFAULT_FACE_CAPTION, **kwargs: Any) -> str:
    """The model's caption, or ``template`` without a model or when its answer is unusable."""
    if captioner is None:
        return template
    caption = captioner.describe(image, **kwargs)
    if not caption:
        logger.warning("ConsistentID: %s gave no usable face description; using the template caption", captioner.name)
        return template
    return caption
