"""The handler's picture decoding matches a Hugging Face image processor's settings, read
from preprocessor_config.json by gradnorm-archive --hf-model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import parse_handler_config
from torchserve_gradnorm.hf import image_input


@pytest.mark.parametrize(
    "settings",
    [
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]},
        {"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [60.0] * 3},
        {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3},
        {"do_normalize": False},
    ],
)
def test_pictures_decode_as_the_image_processor_prepares_them(tmp_path, settings):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, **settings)
    processor.save_pretrained(tmp_path)
    config = parse_handler_config({"input": image_input(tmp_path)})
    assert config.input.size == (16, 16)
    picture = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    ours = RequestDecoder(config.input, config.limits).decode(buffer.getvalue()).samples
    theirs = processor(Image.fromarray(picture), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
