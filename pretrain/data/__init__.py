"""Shard stream, tokenizer and image transforms (see ``stream.py`` for balance and resume)."""
from pretrain.data.loader import TrainLoader
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.transforms import decode_image, image_transform

__all__ = ["TrainLoader", "Tokenizer", "decode_image", "image_transform"]
