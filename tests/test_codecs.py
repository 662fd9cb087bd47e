"""Request bodies -> model input tensors: what is accepted, what it decodes to, and the HTTP
status of every refusal (400 bad body, 413 over a limit, 415 wrong kind of body).

Pictures are made with Pillow inside the tests; the few numbers checked are worked out by
hand from tiny pictures.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from torchserve_gradnorm.codecs import Decoded, RequestDecoder, RequestError, request_payload
from torchserve_gradnorm.config import parse_handler_config

# --- helpers ---------------------------------------------------------------------------------


def make_decoder(limits: dict[str, Any] | None = None, **input_spec: Any) -> RequestDecoder:
    """A decoder built the way the service builds it: from a parsed handler section."""
    config = parse_handler_config({"input": input_spec, "limits": limits})
    return RequestDecoder(config.input, config.limits)


def tensor_decoder(shape=(2, 3), dtype="float32", **limits: Any) -> RequestDecoder:
    return make_decoder(limits or None, kind="tensor", shape=list(shape), dtype=dtype)


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gray(pixels: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.array(pixels, dtype=np.uint8), mode="L")


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG signature + IHDR (correct CRC) + IEND, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def refusal(decoder: RequestDecoder, payload: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        decoder.decode(payload)
    return info.value


# 2x2 grayscale picture whose mean pixel is exactly 100
CHECKER = [[0, 100], [200, 100]]


# --- pictures --------------------------------------------------------------------------------


def test_png_is_resized_with_box_and_normalized():
    decoder = make_decoder(size=[1, 1], mode="L", mean=0.25, std=0.5, resample="box")
    decoded = decoder.decode(encode(gray(CHECKER)))
    assert isinstance(decoded, Decoded)
    assert decoded.many is False
    assert decoded.samples.shape == (1, 1, 1, 1)
    assert decoded.samples.dtype == torch.float32
    expected = (100 / 255 - 0.25) / 0.5
    assert decoded.samples.item() == pytest.approx(expected, abs=1e-6)


def test_picture_without_size_keeps_its_pixels_scaled_to_unit_range():
    decoded = make_decoder(mode="L").decode(encode(gray(CHECKER)))
    assert decoded.samples.shape == (1, 1, 2, 2)
    expected = torch.tensor(CHECKER, dtype=torch.float32) / 255
    torch.testing.assert_close(decoded.samples[0, 0], expected)


def test_size_is_height_then_width():
    decoded = make_decoder(size=[2, 3], mode="RGB").decode(encode(noise(width=12, height=8)))
    assert decoded.samples.shape == (1, 3, 2, 3)


def test_jpeg_is_decoded():
    picture = Image.new("L", (16, 16), color=128)
    decoder = make_decoder(size=[4, 4], mode="L", mean=[0.5], std=[0.25])
    decoded = decoder.decode(encode(picture, "JPEG", quality=95))
    assert decoded.samples.shape == (1, 1, 4, 4)
    # a flat JPEG decodes to within a level of its colour
    expected = (128 / 255 - 0.5) / 0.25
    assert torch.allclose(decoded.samples, torch.full_like(decoded.samples, expected), atol=0.02)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_picture_formats(fmt):
    picture = Image.new("L", (3, 2), color=51)
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = make_decoder(mode="L").decode(encode(picture, fmt, **options))
    torch.testing.assert_close(decoded.samples, torch.full((1, 1, 2, 3), 51 / 255))


def test_rgb_channels_come_first_with_per_channel_mean_and_std():
    picture = Image.new("RGB", (2, 1), color=(255, 0, 51))
    decoder = make_decoder(mode="RGB", mean=[0.5, 0.0, 0.1], std=[0.5, 1.0, 0.2])
    decoded = decoder.decode(encode(picture))
    assert decoded.samples.shape == (1, 3, 1, 2)
    red, green, blue = decoded.samples[0, :, 0, 0].tolist()
    assert red == pytest.approx((1.0 - 0.5) / 0.5)
    assert green == pytest.approx(0.0)
    assert blue == pytest.approx((0.2 - 0.1) / 0.2, abs=1e-6)


def test_a_colour_picture_is_made_gray_for_an_l_model():
    picture = Image.new("RGB", (1, 1), color=(255, 0, 0))
    decoded = make_decoder(mode="L").decode(encode(picture))
    assert decoded.samples.shape == (1, 1, 1, 1)
    assert decoded.samples.item() == pytest.approx(76 / 255)  # ITU-R 601-2 luma of pure red


def test_a_gray_picture_is_made_rgb_for_an_rgb_model():
    decoded = make_decoder(mode="RGB").decode(encode(gray(CHECKER)))
    assert decoded.samples.shape == (1, 3, 2, 2)
    for channel in decoded.samples[0]:
        torch.testing.assert_close(channel, torch.tensor(CHECKER, dtype=torch.float32) / 255)


def test_a_palette_picture_with_transparency_is_converted():
    picture = noise(4, 4).convert("P")
    decoded = make_decoder(mode="RGB").decode(encode(picture))
    assert decoded.samples.shape == (1, 3, 4, 4)


# --- base64 pictures in JSON -----------------------------------------------------------------


def test_base64_picture_in_data():
    decoder = make_decoder(size=[1, 1], mode="L", resample="box")
    body = json.dumps({"data": b64(encode(gray(CHECKER)))}).encode()
    decoded = decoder.decode(body)
    assert decoded.many is False
    assert decoded.samples.shape == (1, 1, 1, 1)
    assert decoded.samples.item() == pytest.approx(100 / 255)


def test_base64_pictures_in_instances():
    decoder = make_decoder(size=[1, 1], mode="L", resample="box")
    pictures = [encode(gray(CHECKER)), encode(Image.new("L", (5, 3), color=10), "JPEG")]
    payload = {"instances": [{"b64": b64(pictures[0])}, b64(pictures[1])]}
    decoded = decoder.decode(payload)  # TorchServe hands over parsed JSON as a dict
    assert decoded.many is True
    assert decoded.samples.shape == (2, 1, 1, 1)
    assert decoded.samples[0].item() == pytest.approx(100 / 255)
    assert decoded.samples[1].item() == pytest.approx(10 / 255, abs=2 / 255)


def test_invalid_base64_is_refused():
    error = refusal(make_decoder(mode="L"), {"data": "not base64 at all!"})
    assert error.status == 400
    assert "base64" in error.message


def test_base64_of_something_that_is_not_a_picture_is_refused():
    assert refusal(make_decoder(mode="L"), {"data": b64(b"hello world")}).status == 400


# --- JSON tensors ----------------------------------------------------------------------------


def test_json_data_of_the_configured_shape():
    decoded = tensor_decoder().decode(b'{"data": [[1, 2, 3], [4.5, 5, 6]]}')
    assert decoded.many is False
    assert decoded.samples.shape == (1, 2, 3)
    assert decoded.samples.dtype == torch.float32
    torch.testing.assert_close(
        decoded.samples[0], torch.tensor([[1, 2, 3], [4.5, 5, 6]], dtype=torch.float32)
    )


@pytest.mark.parametrize(
    "payload",
    [
        '{"data": [[1, 2, 3], [4, 5, 6]]}',
        b'{"data": [[1, 2, 3], [4, 5, 6]]}',
        bytearray(b'{"data": [[1, 2, 3], [4, 5, 6]]}'),
        {"data": [[1, 2, 3], [4, 5, 6]]},
    ],
    ids=["str", "bytes", "bytearray", "parsed"],
)
def test_json_arrives_as_text_bytes_or_parsed(payload):
    assert tensor_decoder().decode(payload).samples.shape == (1, 2, 3)


def test_json_instances_give_a_batch():
    samples = [[[i, i, i], [i, i, i]] for i in range(4)]
    decoded = tensor_decoder().decode({"instances": samples})
    assert decoded.many is True
    assert decoded.samples.shape == (4, 2, 3)
    assert decoded.samples[:, 0, 0].tolist() == [0, 1, 2, 3]


def test_one_instance_is_still_many():
    decoded = tensor_decoder().decode({"instances": [[[0, 0, 0], [0, 0, 0]]]})
    assert decoded.many is True
    assert decoded.samples.shape == (1, 2, 3)


def test_without_a_configured_shape_any_shape_goes():
    decoder = make_decoder(kind="tensor")
    assert decoder.decode({"data": [[1, 2], [3, 4], [5, 6]]}).samples.shape == (1, 3, 2)


def test_an_image_model_takes_a_tensor_of_its_input_shape():
    decoder = make_decoder(size=[2, 2], mode="L")
    decoded = decoder.decode({"data": [[[0.1, 0.2], [0.3, 0.4]]]})
    assert decoded.samples.shape == (1, 1, 2, 2)
    assert refusal(decoder, {"data": [[0.1, 0.2], [0.3, 0.4]]}).status == 400


def test_wrong_shape_names_the_expected_shape():
    error = refusal(tensor_decoder(), {"data": [[1, 2], [3, 4], [5, 6]]})
    assert error.status == 400
    assert "[2, 3]" in error.message and "[3, 2]" in error.message


def test_one_wrong_instance_fails_the_request():
    good = [[1, 2, 3], [4, 5, 6]]
    error = refusal(tensor_decoder(), {"instances": [good, [[1, 2, 3]]]})
    assert error.status == 400 and "[2, 3]" in error.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [[NaN, 2, 3], [4, 5, 6]]}',
        b'{"data": [[1, 2, 3], [4, Infinity, 6]]}',
        b'{"data": [[1, 2, 3], [4, 5, -Infinity]]}',
        b'{"instances": [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, NaN]]]}',
    ],
    ids=["nan", "inf", "-inf", "nan-in-an-instance"],
)
def test_nan_and_infinity_are_refused(body):
    error = refusal(tensor_decoder(), body)
    assert error.status == 400
    assert "NaN" in error.message


def test_nan_in_a_parsed_payload_is_refused():
    assert refusal(tensor_decoder(), {"data": [[float("nan")] * 3] * 2}).status == 400


@pytest.mark.parametrize(
    "data",
    [
        [[1, 2, 3], [4, 5]],
        [[1, 2, 3], 4],
        [[1, 2, 3], [4, 5, [6]]],
    ],
    ids=["short-row", "number-for-a-row", "list-for-a-number"],
)
def test_ragged_lists_are_refused(data):
    error = refusal(tensor_decoder(), {"data": data})
    assert error.status == 400
    assert "rectangular" in error.message


@pytest.mark.parametrize(
    "data",
    [
        [["1", "2", "3"], ["4", "5", "6"]],
        [[1, 2, 3], [4, 5, "6"]],
        [[True, False, True], [False, True, False]],
        [[{"x": 1}, 2, 3], [4, 5, 6]],
        [[None, 2, 3], [4, 5, 6]],
        {"x": 1},
        True,
        None,
    ],
    ids=[
        "numeric-strings",
        "one-string",
        "booleans",
        "a-dict",
        "a-null",
        "dict",
        "bool",
        "null",
    ],
)
def test_non_numbers_are_refused(data):
    assert refusal(tensor_decoder(), {"data": data}).status == 400


def test_a_string_for_a_tensor_model_is_a_picture_it_does_not_take():
    assert refusal(tensor_decoder(), {"data": "1, 2, 3"}).status == 415


@pytest.mark.parametrize(
    "payload",
    [
        b'{"inputs": [1, 2, 3]}',
        b"[[1, 2, 3], [4, 5, 6]]",
        b"42",
        {"instances": []},
        {"instances": {"a": [1]}},
    ],
    ids=["unknown-key", "bare-list", "bare-number", "no-instances", "instances-not-a-list"],
)
def test_json_of_the_wrong_form_is_refused(payload):
    assert refusal(tensor_decoder(), payload).status == 400


def test_invalid_json_text_is_refused():
    assert refusal(tensor_decoder(), '{"data": [1, 2').status == 400


# --- int64 tensors ---------------------------------------------------------------------------


def test_int64_model_takes_whole_numbers():
    decoded = tensor_decoder(shape=[3], dtype="int64").decode({"data": [1, 2.0, -7]})
    assert decoded.samples.dtype == torch.int64
    assert decoded.samples.tolist() == [[1, 2, -7]]


def test_int64_model_keeps_large_integers_exact():
    big = 2**53 + 1  # not representable as a float64
    decoded = tensor_decoder(shape=[1], dtype="int64").decode({"data": [big]})
    assert decoded.samples.item() == big


def test_int64_model_refuses_fractions():
    error = refusal(tensor_decoder(shape=[3], dtype="int64"), {"data": [1, 2.5, 3]})
    assert error.status == 400
    assert "int64" in error.message


# --- .npy ------------------------------------------------------------------------------------


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint8"])
def test_npy_is_accepted(dtype):
    array = np.arange(6, dtype=dtype).reshape(2, 3)
    decoded = tensor_decoder().decode(npy(array))
    assert decoded.many is False
    assert decoded.samples.dtype == torch.float32
    assert decoded.samples.tolist() == [array.astype(np.float32).tolist()]


def test_npy_of_the_wrong_shape_is_refused():
    error = refusal(tensor_decoder(), npy(np.zeros((3, 2), np.float32)))
    assert error.status == 400 and "[2, 3]" in error.message


def test_npy_with_nan_is_refused():
    array = np.zeros((2, 3), np.float32)
    array[1, 1] = np.nan
    assert refusal(tensor_decoder(), npy(array)).status == 400


def test_truncated_npy_is_refused():
    body = npy(np.zeros((2, 3), np.float32))
    assert refusal(tensor_decoder(), body[:-5]).status == 400


def test_npy_of_strings_is_refused():
    assert refusal(tensor_decoder(), npy(np.array([["a"] * 3] * 2))).status == 400


UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Tripwire:
    """Pickles to a call of ``_record_unpickling``: unpickling it leaves a trace."""

    def __reduce__(self):
        return (_record_unpickling, ("unpickled!",))


def test_npy_of_objects_is_refused_and_never_unpickled():
    array = np.empty((2, 3), dtype=object)
    array[...] = _Tripwire()
    body = npy(array, allow_pickle=True)
    # the file really does unpickle to the tripwire when someone allows it
    np.load(io.BytesIO(body), allow_pickle=True)
    assert UNPICKLED
    UNPICKLED.clear()

    error = refusal(tensor_decoder(), body)
    assert error.status == 400
    assert UNPICKLED == []


# --- limits ----------------------------------------------------------------------------------


def test_a_huge_png_header_is_refused_before_decoding():
    # a valid signature and IHDR claiming 60000x60000 pixels, and no pixel data at all:
    # decoding would fail with 400, so a 413 shows the header was judged first
    error = refusal(make_decoder(mode="L"), png_header_only(60_000, 60_000))
    assert error.status == 413


def test_the_max_pixels_limit_is_read_from_the_header():
    header = png_header_only(5_000, 5_000)  # 25 MP: over the default 16 MP limit
    error = refusal(make_decoder(mode="L"), header)
    assert error.status == 413
    assert "5000x5000" in error.message
    # under a higher limit the same body gets as far as decoding, and fails there
    roomy = make_decoder({"max_pixels": 30_000_000}, mode="L")
    assert refusal(roomy, header).status == 400


def test_max_pixels_applies_to_real_pictures_and_base64():
    decoder = make_decoder({"max_pixels": 15}, mode="L")
    picture = encode(Image.new("L", (4, 4)))
    assert refusal(decoder, picture).status == 413
    assert refusal(decoder, {"data": b64(picture)}).status == 413
    assert decoder.decode(encode(Image.new("L", (5, 3)))).samples.shape == (1, 1, 3, 5)


def test_max_tensor_elements():
    decoder = tensor_decoder(max_tensor_elements=5)
    error = refusal(decoder, {"data": [[1, 2, 3], [4, 5, 6]]})
    assert error.status == 413
    assert "6" in error.message and "5" in error.message
    assert refusal(decoder, npy(np.zeros((2, 3), np.float32))).status == 413
    unshaped = make_decoder({"max_tensor_elements": 5}, kind="tensor")
    assert unshaped.decode({"data": [1, 2, 3, 4, 5]}).samples.shape == (1, 5)
    assert refusal(unshaped, {"data": [1, 2, 3, 4, 5, 6]}).status == 413


def test_max_instances():
    decoder = tensor_decoder(shape=[1], max_instances=2)
    assert decoder.decode({"instances": [[1], [2]]}).samples.shape == (2, 1)
    error = refusal(decoder, {"instances": [[1], [2], [3]]})
    assert error.status == 413
    assert "3" in error.message and "2" in error.message


# --- broken and empty bodies -----------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_png_is_refused(fraction):
    body = encode(noise(32, 32))
    error = refusal(make_decoder(mode="RGB"), body[: int(len(body) * fraction)])
    assert error.status == 400


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_refused(fraction):
    body = encode(noise(64, 64), "JPEG", quality=90)
    error = refusal(make_decoder(mode="RGB"), body[: int(len(body) * fraction)])
    assert error.status == 400


@pytest.mark.parametrize("kind", ["image", "tensor"])
@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_refused(kind, seed):
    body = random.Random(seed).randbytes(256)
    assert refusal(make_decoder(kind=kind), body).status == 400


@pytest.mark.parametrize("kind", ["image", "tensor"])
@pytest.mark.parametrize("body", [b"", b"   \n\t\r\n "], ids=["empty", "whitespace"])
def test_empty_bodies_are_refused(kind, body):
    error = refusal(make_decoder(kind=kind), body)
    assert error.status == 400
    assert "empty" in error.message


def test_magic_bytes_alone_are_refused():
    assert refusal(make_decoder(), b"\x89PNG\r\n\x1a\n").status == 400
    assert refusal(make_decoder(), b"\xff\xd8\xff").status == 400


# --- a picture for a tensor model ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_picture_sent_to_a_tensor_model_is_unsupported(fmt):
    picture = encode(noise(4, 4), fmt)
    assert refusal(tensor_decoder(), picture).status == 415
    assert refusal(tensor_decoder(), {"data": b64(picture)}).status == 415
    assert refusal(tensor_decoder(), {"instances": [{"b64": b64(picture)}]}).status == 415


# --- request_payload -------------------------------------------------------------------------


def test_request_payload_prefers_data():
    assert request_payload({"data": b"a", "body": b"b"}) == b"a"


def test_request_payload_then_body():
    assert request_payload({"body": {"data": [1]}}) == {"data": [1]}
    assert request_payload({"data": None, "body": b"b"}) == b"b"


def test_request_payload_takes_a_lone_form_field():
    assert request_payload({"file": b"picture"}) == b"picture"
    assert request_payload({"file": b"picture", "other": None}) == b"picture"


def test_request_payload_refuses_several_form_fields():
    error = _payload_refusal({"a": b"1", "b": b"2"})
    assert error.status == 400
    assert "'data'" in error.message


@pytest.mark.parametrize("request_dict", [{}, {"data": None, "body": None}])
def test_request_payload_refuses_an_empty_request(request_dict):
    error = _payload_refusal(request_dict)
    assert error.status == 400
    assert "empty" in error.message


def _payload_refusal(request_dict: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        request_payload(request_dict)
    return info.value


def test_a_torchserve_request_end_to_end():
    """What TorchServe hands the handler for a multipart upload and for a JSON post."""
    decoder = make_decoder(size=[1, 1], mode="L", resample="box")
    upload = {"data": bytearray(encode(gray(CHECKER)))}
    assert decoder.decode(request_payload(upload)).samples.item() == pytest.approx(100 / 255)
    posted = {"body": {"instances": [b64(encode(gray(CHECKER)))] * 2}}
    decoded = decoder.decode(request_payload(posted))
    assert decoded.many is True and decoded.samples.shape == (2, 1, 1, 1)


def test_example_is_a_zero_batch_of_the_input_shape():
    example = make_decoder(size=[4, 5], mode="RGB").example()
    assert example is not None and example.shape == (1, 3, 4, 5)
    assert tensor_decoder(dtype="int64").example().dtype == torch.int64
    assert make_decoder(mode="L").example() is None


# --- what the error says about the body that was sent ----------------------------------------

MALFORMED_JSON = b'{"data": [[1,2,'


@pytest.mark.parametrize("kind", ["image", "tensor"])
@pytest.mark.parametrize(
    "payload", [MALFORMED_JSON, bytearray(MALFORMED_JSON), MALFORMED_JSON.decode()],
    ids=["bytes", "bytearray", "text"],
)  # fmt: skip
def test_malformed_json_is_reported_as_json_with_where_it_broke(kind, payload):
    error = refusal(make_decoder(kind=kind), payload)
    assert error.status == 400
    assert error.message == "the body is not valid JSON: Expecting value at line 1, column 16"


def test_a_json_error_on_a_later_line_names_that_line():
    body = b'{\n  "data": [1, 2],\n  "extra": tru\n}'
    error = refusal(tensor_decoder(), body)
    assert error.message.startswith("the body is not valid JSON: ")
    assert error.message.endswith("at line 3, column 12")


def test_json_with_a_byte_order_mark_or_leading_blanks_is_read():
    body = b'\xef\xbb\xbf \n{"data": [[1, 2, 3], [4, 5, 6]]}'
    assert tensor_decoder().decode(body).samples.shape == (1, 2, 3)


@pytest.mark.parametrize(
    "request_dict",
    [{}, {"body": b""}, {"data": bytearray()}, {"body": ""}, {"body": "  \n"}, {"data": b" \t"}],
    ids=["no-field", "raw", "form", "text", "blank-text", "blank-bytes"],
)
def test_an_empty_body_gets_one_message_however_it_was_sent(request_dict):
    with pytest.raises(RequestError) as info:
        make_decoder().decode(request_payload(request_dict))
    assert info.value.status == 400
    assert info.value.message == "the body is empty: send a picture, .npy or JSON"


def test_a_body_that_is_no_picture_npy_or_json_says_so():
    error = refusal(make_decoder(), b"hello, model")
    assert error.status == 400
    assert error.message == (
        "the body is neither a picture (PNG, JPEG, GIF, BMP, WebP, TIFF), .npy nor JSON"
    )
    error = refusal(tensor_decoder(), b"hello, model")
    assert error.message == "the body is neither .npy nor JSON (this model takes tensors)"


def test_a_broken_picture_and_a_broken_npy_are_named_as_such():
    picture = encode(noise(32, 32))
    assert refusal(make_decoder(), picture[:100]).message.startswith("cannot decode the picture: ")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3), dtype=np.float32))
    truncated = buffer.getvalue()[:-5]
    assert refusal(tensor_decoder(), truncated).message.startswith("cannot decode the .npy array: ")
