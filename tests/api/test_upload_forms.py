"""How edit uploads are read: one mask at most, in multipart and in JSON; EXIF orientation; data URLs and images
too large for Pillow's own limit. In process, on the fake engine (its jobs show what the worker would get)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from test_errors import EDITS, _png, assert_error

CLEAR = (0, 0, 0, 0)  # a transparent mask pixel: edit here


@pytest.fixture
def edits(fresh_api):
    return fresh_api


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _mask(width: int = 256, height: int = 256) -> bytes:
    return _png(width, height, "RGBA", CLEAR)


def test_a_second_mask_part_is_refused_not_one_of_them_used(edits):
    files = [
        ("image", ("a.png", _png(), "image/png")),
        ("mask", ("m.png", _mask(), "image/png")),
        ("mask", ("n.png", _mask(), "image/png")),
    ]
    error = assert_error(edits.client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="mask")
    assert error["code"] == "too_many_files" and "one mask" in error["message"]
    assert edits.engine.jobs == []


def test_a_json_mask_may_be_a_list_of_one(edits):
    body = {"prompt": "a cat", "image": [_b64(_png())], "mask": [_b64(_mask())], "num_inference_steps": 2}
    response = edits.client.post(EDITS, json=body)
    assert response.status_code == 200, response.text[:300]
    ((_, job),) = edits.engine.jobs
    assert job.mode == "inpaint" and job.mask is not None and job.mask.shape == (256, 256)


def test_a_json_list_of_two_masks_is_refused(edits):
    body = {"prompt": "a cat", "image": _b64(_png()), "mask": [_b64(_mask()), _b64(_mask())]}
    error = assert_error(edits.client.post(EDITS, json=body), 400, param="mask")
    assert error["code"] == "too_many_files"


def _jpeg_turned(orientation: int) -> bytes:
    """A 320x256 JPEG whose EXIF says how to turn it (6: a quarter turn clockwise, so it shows 256 wide, 320 high)."""
    image = Image.new("RGB", (320, 256), (200, 40, 40))
    image.paste((40, 40, 200), (0, 0, 160, 256))  # left half blue: where it lands shows the turn
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_the_exif_orientation_of_an_upload_is_applied(edits):
    files = {"image": ("photo.jpg", _jpeg_turned(6), "image/jpeg")}
    response = edits.client.post(EDITS, data={"prompt": "a hat", "num_inference_steps": "2"}, files=files)
    assert response.status_code == 200, response.text[:300]
    ((_, job),) = edits.engine.jobs
    pixels = job.images[0]
    assert pixels.shape[:2] == (320, 256)  # upright: taller than wide
    top, bottom = pixels[:40].reshape(-1, 3).mean(axis=0), pixels[-40:].reshape(-1, 3).mean(axis=0)
    assert top[2] > 150 > bottom[2]  # turned clockwise, the blue left half is on top


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 12_000, 100_000])  # over the server's limit; over Pillow's (89 Mpx, 178 Mpx)
def test_an_image_over_the_pixel_limit_says_so_whatever_its_size(edits, side):
    files = {"image": ("big.png", _png_header(side, side), "image/png")}
    error = assert_error(edits.client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="image")
    assert "pixels this server accepts" in error["message"], error["message"]


@pytest.mark.parametrize("url", ["data:text/plain;base64,aGVsbG8=", "data:application/pdf;base64,aGVsbG8="])
def test_a_data_url_of_something_else_than_an_image_says_so(edits, url):
    error = assert_error(edits.client.post(EDITS, json={"prompt": "a cat", "image": url}), 400, param="image")
    assert "not of an image" in error["message"] and "base64" not in error["message"]


def test_an_image_data_url_still_decodes(edits):
    body = {"prompt": "a cat", "image": "data:image/png;base64," + _b64(_png()), "num_inference_steps": 2}
    assert edits.client.post(EDITS, json=body).status_code == 200
    assert np.asarray(edits.engine.jobs[0][1].images[0]).shape == (256, 256, 3)


def test_an_image_part_without_a_filename_is_told_to_come_as_a_file(edits):
    """A multipart part without a filename is a text field (httpx sends ``(None, bytes)`` so): image bytes there are
    not base64, and the message says how to send a file. The same bytes with a filename, and base64 in a text field,
    are taken."""
    png = _png()
    for image in ((None, png), (None, png, "image/png")):
        response = edits.client.post(EDITS, data={"prompt": "a cat"}, files={"image": image})
        error = assert_error(response, 400, param="image")
        assert error["message"] == (
            "'image' is not valid base64 or a base64 data URL: it came as a text field (a part without a filename); "
            "send an image file with a filename (curl -F 'image=@photo.png') or its base64"
        )
    data = {"prompt": "a cat", "num_inference_steps": "2"}
    assert edits.client.post(EDITS, data=data, files={"image": ("in.png", png)}).status_code == 200
    assert edits.client.post(EDITS, data=data, files={"image": (None, _b64(png).encode())}).status_code == 200
    # JSON bodies have no files: their message stays the plain one
    error = assert_error(edits.client.post(EDITS, json={"prompt": "a cat", "image": "@@@"}), 400, param="image")
    assert error["message"] == "'image' is not valid base64 or a base64 data URL"


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart body as curl sends it: ``(name, filename or None, content)`` parts, then the closing delimiter."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: image/png\r\n" if filename else ""
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("cut", ["in_the_image", "before_the_closing_boundary"])
def test_a_multipart_body_cut_short_says_so(edits, cut):
    boundary = "qis-test-boundary"
    whole = _multipart(boundary, [("prompt", None, b"a cat"), ("image", "a.png", _png())])
    body = whole[: len(whole) // 2] if cut == "in_the_image" else whole[: -len(f"--{boundary}--\r\n")]
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    error = assert_error(edits.client.post(EDITS, content=body, headers=headers), 400)
    assert "cut short" in error["message"] and "image is required" not in error["message"]
    assert edits.engine.jobs == []


@pytest.mark.parametrize("quoted", [False, True])
def test_a_whole_multipart_body_is_read(edits, quoted):
    boundary = "qis-test-boundary"
    body = _multipart(boundary, [("prompt", None, b"a cat"), ("num_inference_steps", None, b"2"), ("image", "a.png", _png())])
    value = f'"{boundary}"' if quoted else boundary
    response = edits.client.post(EDITS, content=body, headers={"content-type": f"multipart/form-data; boundary={value}"})
    assert response.status_code == 200, response.text[:300]


def test_an_edit_of_several_images_naming_no_model_goes_to_an_edit_plus_model(edits):
    """The README's own example of several images names no model: on a server whose first edit model edits one image
    at a time it was a 400 ("edits one image at a time"); the first edit-plus model is the suitable default, one image
    still goes to the first edit model, and the metrics count each under the model that served it."""
    from conftest import EDIT, PLUS

    files = [("image[]", ("a.png", _png(256, 256), "image/png")), ("image[]", ("b.png", _png(256, 256), "image/png"))]
    several = edits.client.post(EDITS, data={"prompt": "the two together"}, files=files)
    assert several.status_code == 200, several.text
    one = edits.client.post(EDITS, data={"prompt": "one"}, files=[files[0]])
    assert one.status_code == 200, one.text
    assert [model for model, _ in edits.engine.jobs] == [PLUS, EDIT]
    refused = edits.client.post(EDITS, data={"prompt": "the two together", "size": "17x17"}, files=files)
    assert refused.status_code == 400
    metrics = edits.client.get("/metrics").text
    for model, status, count in ((PLUS, 200, 1), (EDIT, 200, 1), (PLUS, 400, 1)):
        line = f'qis_requests_total{{model="{model}",route="/v1/images/edits",status="{status}"}} {count}.0'
        assert line in metrics, [m for m in metrics.splitlines() if "qis_requests_total" in m]


def test_a_base64_image_in_a_text_field_may_be_larger_than_a_mebibyte(edits):
    """README: form fields may carry base64 images; the limit is the body's (QIS_MAX_UPLOAD_BYTES), not the 1 MiB
    Starlette allows a text field."""
    noise = np.random.default_rng(1).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    encoded = _b64(buffer.getvalue()).encode()
    assert len(encoded) > 1.2 * 2**20
    data = {"prompt": "a cat", "num_inference_steps": "2"}
    response = edits.client.post(EDITS, data=data, files={"image": (None, encoded)})
    assert response.status_code == 200, response.text[:300]
    assert edits.client.post(EDITS, data=data, files={"image": ("a.png", buffer.getvalue())}).status_code == 200
    as_text, as_file = (np.asarray(job.images[0]) for _, job in edits.engine.jobs)
    assert np.array_equal(as_text, as_file)


@pytest.mark.parametrize("kind", ["Multipart/Form-Data", "MULTIPART/FORM-DATA", "Application/JSON", "application/vnd.api+json"])
def test_media_types_are_read_in_any_case(edits, kind):
    """Media types are case-insensitive (RFC 9110): ``Multipart/Form-Data`` was told to send multipart/form-data."""
    boundary = "qis-test-boundary"
    if kind.lower().startswith("multipart"):
        body = _multipart(boundary, [("prompt", None, b"a cat"), ("num_inference_steps", None, b"2"), ("image", "a.png", _png())])
        content_type = f"{kind}; boundary={boundary}"
    else:
        body = json.dumps({"prompt": "a cat", "num_inference_steps": 2, "image": _b64(_png())}).encode()
        content_type = kind
    response = edits.client.post(EDITS, content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text[:300]


def test_a_multipart_body_with_an_epilogue_is_whole(edits):
    """RFC 2046 allows text after the closing delimiter: a body with 300 bytes there was called cut short."""
    boundary = "qis-test-boundary"
    body = _multipart(boundary, [("prompt", None, b"a cat"), ("num_inference_steps", None, b"2"), ("image", "a.png", _png())])
    response = edits.client.post(
        EDITS, content=body + b"epilogue " * 40, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text[:300]


def test_a_file_input_left_empty_is_no_file(edits):
    """A browser's form sends a file input left empty as a part with an empty filename and no bytes: an optional
    mask so is no mask (it was "'mask' is empty"); a required image so is missing."""
    boundary = "qis-test-boundary"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    fields = [("prompt", None, b"a cat"), ("num_inference_steps", None, b"2")]
    left_empty = f'--{boundary}\r\nContent-Disposition: form-data; name="{{}}"; filename=""\r\n'
    left_empty += "Content-Type: application/octet-stream\r\n\r\n\r\n"

    def body(parts, empty_input: str | None) -> bytes:
        whole = _multipart(boundary, fields + parts)
        if empty_input is None:
            return whole
        return whole.replace(f"--{boundary}--".encode(), left_empty.format(empty_input).encode() + f"--{boundary}--".encode())

    response = edits.client.post(EDITS, content=body([("image", "a.png", _png())], "mask"), headers=headers)
    assert response.status_code == 200, response.text[:300]
    assert edits.engine.jobs[0][1].mask is None
    error = assert_error(edits.client.post(EDITS, content=body([], "image"), headers=headers), 400)
    assert "image" in error["message"] and "empty" not in error["message"]
    named = body([("image", "a.png", _png()), ("mask", "m.png", b"")], None)  # a file with a name, but empty
    assert (
        assert_error(edits.client.post(EDITS, content=named, headers=headers), 400, param="mask")["message"] == "'mask' is empty"
    )


@pytest.mark.parametrize(
    "prefix",
    [
        "data:image/png;name=a.png;base64,",
        "data:image/png;charset=binary;base64,",
        "DATA:IMAGE/PNG;BASE64,",
        "Data:image/png;base64,",
    ],
)
def test_an_image_data_url_with_parameters_or_in_capitals_decodes(edits, prefix):
    """RFC 2397 allows parameters before ``;base64`` and the scheme is case-insensitive: these were refused, the
    first ones as "a data URL of image/png, not of an image"."""
    body = {"prompt": "a cat", "image": prefix + _b64(_png()), "num_inference_steps": 2}
    response = edits.client.post(EDITS, json=body)
    assert response.status_code == 200, response.text[:300]


def test_an_image_data_url_not_in_base64_says_so(edits):
    error = assert_error(edits.client.post(EDITS, json={"prompt": "a cat", "image": "data:image/png,%89PNG"}), 400, param="image")
    assert error["message"] == "'image' is a data URL of image/png without ';base64': send data:image/png;base64,..."


def test_a_model_name_is_echoed_cut_short(edits):
    """An error repeats the model a client named, in ``message`` and ``detail``: a megabyte of name came back twice."""
    response = edits.client.post("/v1/images/generations", json={"prompt": "a cat", "model": "m" * 1_000_000})
    error = assert_error(response, 400, param="model")
    assert error["message"] == f"Model not available: {'m' * 200}... (1000000 characters)"
    assert len(response.content) < 2_000
