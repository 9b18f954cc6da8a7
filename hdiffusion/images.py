"""Model images ([-1, 1] tensors) to PNG files and grids."""

import math

import torch
from PIL import Image


def to_uint8(images):
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] on the CPU."""
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(image_uint8):
    array = image_uint8.numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid_shape(n, columns=None):
    columns = columns or math.ceil(math.sqrt(n))
    return math.ceil(n / columns), columns


def make_grid(images, columns=None, padding=2):
    """Tile [N, C, H, W] images into one PIL image, row by row, with a black border between them."""
    pixels = to_uint8(images)
    n, height, width, channels = pixels.shape
    rows, columns = grid_shape(n, columns)
    canvas = torch.zeros(rows * (height + padding) + padding, columns * (width + padding) + padding, channels,
                         dtype=torch.uint8)
    for i in range(n):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        canvas[top:top + height, left:left + width] = pixels[i]
    return to_pil(canvas)


def save_images(images, paths):
    for image, path in zip(to_uint8(images), paths):
        to_pil(image).save(path)
