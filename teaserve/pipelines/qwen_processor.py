"""Loading the Qwen2-VL processor of the Qwen-Image edit models on machines without torchvision.

In transformers 5, `Qwen2VLProcessor` requires a video sub-processor, which only exists when torchvision
imports; the edit pipelines never use it. A subclass whose constructor does not name it works with the PIL image
processor alone, and loads the processor folder of a real checkpoint unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2VLProcessor

PROCESSOR_ENTRY = ["transformers", "Qwen2VLProcessor"]


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video sub-processor (its attributes come from this constructor's signature)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a RuntimeError when the build does not match torch
        return False
    return True


def load_processor_without_torchvision(folder: Path) -> Qwen2VLProcessorNoVideo | None:
    """The processor to pass to from_pretrained when the stock one cannot load here; None when it can."""
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("processor") != PROCESSOR_ENTRY or torchvision_available():
        return None
    return Qwen2VLProcessorNoVideo.from_pretrained(str(folder / "processor"))


def build_processor(tokenizer):
    """A processor for freshly built (tiny) edit pipelines: the stock one where torchvision exists."""
    if torchvision_available():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
        )
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLProcessorNoVideo(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
