"""Calibration folders: pictures, .npy and .pt files, one sample or a stack each, decoded
exactly as the server decodes requests, and nothing unpickled."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from torchserve_gradnorm.codecs import RequestDecoder, RequestError
from torchserve_gradnorm.config import parse_handler_config
from torchserve_gradnorm.datasets import augmented_samples, load_samples, sample_files


def tensor_decoder() -> RequestDecoder:
    config = parse_handler_config({"input": {"kind": "tensor", "shape": [2, 3]}})
    return RequestDecoder(config.input, config.limits)


def test_npy_and_pt_files_hold_one_sample_or_a_stack(tmp_path):
    one, stack = np.arange(6.0).reshape(2, 3), np.arange(24.0).reshape(4, 2, 3)
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "stack.npy", stack)
    torch.save(torch.from_numpy(stack), tmp_path / "stack.pt")
    decoder = tensor_decoder()
    assert torch.equal(load_samples(tmp_path / "one.npy", decoder), torch.tensor(one[None]).float())
    assert load_samples(tmp_path / "stack.npy", decoder).shape == (4, 2, 3)
    assert torch.equal(
        load_samples(tmp_path / "stack.pt", decoder), load_samples(tmp_path / "stack.npy", decoder)
    )


def test_pictures_go_through_the_served_preprocessing(tmp_path):
    Image.new("L", (4, 4), 255).save(tmp_path / "white.png")
    config = parse_handler_config({"input": {"size": 2, "mode": "L", "mean": 0.5, "std": 0.5}})
    decoder = RequestDecoder(config.input, config.limits)
    served = decoder.decode((tmp_path / "white.png").read_bytes()).samples
    assert torch.equal(load_samples(tmp_path / "white.png", decoder), served)
    assert torch.allclose(served, torch.ones(1, 1, 2, 2))


def test_pickled_objects_are_never_loaded(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_samples(tmp_path / "objects.npy", tensor_decoder())
    buffer = io.BytesIO()
    torch.save({"not": "a tensor"}, buffer)
    (tmp_path / "dict.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="expected a tensor"):
        load_samples(tmp_path / "dict.pt", tensor_decoder())
    buffer = io.BytesIO()
    torch.save(Image.new("L", (1, 1)), buffer)  # an arbitrary object: needs unpickling code
    (tmp_path / "object.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a plain tensor file"):
        load_samples(tmp_path / "object.pt", tensor_decoder())


def test_a_sample_of_the_wrong_shape_is_refused(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(RequestError, match=r"expected shape \[2, 3\]"):
        load_samples(tmp_path / "bad.npy", tensor_decoder())


def test_folders_list_only_samples_and_must_hold_some(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no pictures"):
        sample_files(tmp_path)
    np.save(tmp_path / "b.npy", np.zeros((2, 3)))
    Image.new("L", (2, 2)).save(tmp_path / "a.png")
    assert [p.name for p in sample_files(tmp_path)] == ["a.png", "b.npy"]


def picture_decoder() -> RequestDecoder:
    config = parse_handler_config(
        {"input": {"size": 8, "mode": "L", "mean": 0.0, "std": 1.0, "resample": "box"}}
    )
    return RequestDecoder(config.input, config.limits)


def test_augmented_copies_are_reproducible_new_renderings_at_the_served_shape(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
            tmp_path / f"{i}.png"
        )
    decoder = picture_decoder()
    first = augmented_samples(tmp_path, decoder, copies=3)
    assert first.shape == (6, 1, 8, 8)
    assert torch.equal(first, augmented_samples(tmp_path, decoder, copies=3))
    assert not torch.equal(first, augmented_samples(tmp_path, decoder, copies=3, seed=1))
    originals = torch.cat([load_samples(p, decoder) for p in sample_files(tmp_path)])
    assert not any(torch.equal(copy, originals[i // 3]) for i, copy in enumerate(first))


def test_augmentation_refuses_tensor_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="pictures and texts only"):
        augmented_samples(tmp_path, tensor_decoder(), copies=2)
