"""Image decoding and preprocessing shared by training and evaluation."""
from __future__ import annotations

import io
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

# OpenAI CLIP's normalisation constants (RGB mean / std).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (Tux Paint stamps, clip-art), and padded to a
    square on white so resizing never distorts or crops the object."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    w, h = image.size
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    return image


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image; raises on corrupt data (callers count and skip)."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so truncated files fail here and not later in a worker
    return to_rgb(image)


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised (3, image_size, image_size) float tensor."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
