"""Hypothesis strategies for request bodies of the Images API, and the checks every response must pass.

Shared by the in-process fuzz tests (tests/unit/test_fuzz.py) and the short run
against a real server (tests/e2e/test_fuzz_server.py). The JSON bodies follow the
request schemas (the app's OpenAPI document and the pydantic request models): each
field is sometimes a value the schema allows, sometimes a wrong type, a huge or
negative number, odd unicode, control characters or nested junk, with unknown
fields mixed in. Images are sometimes small valid PNG/JPEG/WebP files, sometimes
garbage. Multipart bodies are built by hand, so that they can be wrong in ways no
client library would produce (random field names, wrong content types, truncated
parts, missing boundaries).
"""

from __future__ import annotations

import base64
import io
import json
import string

from hypothesis import strategies as st
from PIL import Image

#: Field names the multipart and JSON bodies mix in besides the schema's (unknown fields and near misses).
_ODD_NAMES = ["image[]", "image[0]", "images", "images[]", "mask", "file", "", "Image", "image[x]", "\u00e9", "a" * 300,
              "__proto__"]  # fmt: skip


def tiny_image(width: int, height: int, mode: str, fmt: str) -> bytes:
    """A small valid image file."""
    image = Image.new(mode, (width, height), 128 if mode in ("L", "P") else (10, 200, 30, 0)[: len(mode)])
    if fmt != "PNG" and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


#: Weighted coins (sampled_from draws its elements about evenly; integer ranges lean towards their ends).
_mostly = st.sampled_from([True] * 5 + [False])
_sometimes = st.sampled_from([False] * 4 + [True])

_sides = st.sampled_from([1, 8, 16, 40, 64, 300])
_modes = st.sampled_from(["RGB", "RGBA", "L", "P", "LA"])
_images = st.builds(tiny_image, _sides, _sides, _modes, st.sampled_from(["PNG", "JPEG", "WEBP"]))
_garbage = st.one_of(
    st.binary(max_size=200),
    _images.map(lambda data: data[: len(data) // 2]),  # a truncated image
    st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),  # a PNG signature and nothing valid after it
    st.just(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"),  # a format the server does not decode
)
#: Bytes of an upload: mostly a valid small image, else garbage.
image_bytes = st.one_of(_images, _images, _garbage)


def _as_b64(data: bytes, style: int) -> object:
    text = base64.b64encode(data).decode()
    return [text, f"data:image/png;base64,{text}", {"image_url": f"data:image/png;base64,{text}"}, {"b64_json": text},
            {"image_url": {"url": text}}, text[:-3] + "!!!", " " + text + "\n"][style]  # fmt: skip


#: A JSON image value: base64 (plain, data URL, OpenAI's object shapes), broken base64, or a wrong type.
json_image = st.one_of(
    st.builds(_as_b64, image_bytes, st.integers(0, 6)),
    st.sampled_from(["", "http://127.0.0.1/x.png", "data:image/png;base64,", "not base64 at all", None, 0, [], {}, {"url": 5}]),
)

_weird_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=20),
    st.sampled_from(["\x00", "\ufffd", "\u202e", "🎨" * 50, " ", "x" * 5000]),
)
_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.5, -0.0, 1e308, 1e-308]),
)
#: Any JSON value, nested a little.
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), _numbers, _weird_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)


def _resolve(schema: dict, defs: dict) -> dict:
    ref = schema.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if ref else schema


def _schema_value(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values the schema allows (roughly), including its edges."""
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return st.one_of([_schema_value(s, defs) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -(2**40)))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 2**40))
        if kind == "integer":
            return st.one_of(st.integers(int(lo), int(lo) + 8), st.integers(int(lo), int(hi)), st.just(int(hi)))
        return st.floats(float(lo), float(hi), allow_nan=False)
    if kind == "string":
        # Strings near the values the server understands (sizes, ratios, cache policies, model ids) and odd ones.
        near = ["1024x1024", "256x256", "512X256", "16x16", "99999x99999", "0x0", "auto", "1:1", "4:3", "none", "png", "jpg",
                "a cat", "tiny", "tiny-edit", "tiny-edit-plus", "256 × 512", "-256x256", "fbcache:0.1", "teacache"]  # fmt: skip
        return st.one_of(st.sampled_from(near), _weird_text)
    return junk


def request_fields(schema: dict, defs: dict | None = None, *, images: bool = False) -> st.SearchStrategy[dict]:
    """JSON objects for a request model's schema: its required fields, a few others (sane or not), some unknown ones.
    Each field's strategy is built once, here: building one per drawn body (and hypothesis validating it anew) took
    most of the fuzz tests' time."""
    defs = {**schema.get("$defs", {}), **(defs or {})}
    properties = schema.get("properties", {})
    required = sorted(set(schema.get("required", ())))
    prompts = st.sampled_from(["a cat", "ein Hund im Schnee", "猫"])
    names = st.sampled_from(sorted(properties))
    some_fields, junk_fields = st.lists(names, max_size=5, unique=True), st.lists(names, max_size=2, unique=True)
    values = {name: _schema_value(properties[name], defs) for name in properties}
    unknown = st.dictionaries(st.one_of(st.sampled_from(_ODD_NAMES), st.text(max_size=12)), junk, max_size=2)
    one_or_more = st.one_of(json_image, json_image, json_image, st.lists(json_image, max_size=5))
    several = st.lists(json_image, max_size=5)

    @st.composite
    def body(draw) -> dict:
        fields = {}
        if draw(_mostly):  # mostly a sane prompt (or none, when the schema does not need one)
            fields.update({name: draw(prompts) for name in required})
        for name in draw(some_fields):
            fields[name] = draw(values[name])  # a value the schema allows (roughly)
        for name in draw(junk_fields):
            if draw(_sometimes):
                fields[name] = draw(junk)  # a wrong type, a huge number, odd text, nested junk
        fields.update(draw(unknown))
        if images:
            if draw(_mostly):
                fields["image"] = draw(one_or_more)
            if draw(_sometimes):
                fields["images"] = draw(several)
            if draw(_sometimes):
                fields["mask"] = draw(json_image)
        return fields

    return body()


#: Bodies that attack the parsers: nesting deeper than they go, integers longer than Python converts, floats past the range.
HOSTILE_JSON = [
    b"[" * 30_000,
    b'{"prompt": "a cat", "x": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001,
    b'{"prompt": "a cat", "image": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    b'{"prompt": "a cat", "n": 1' + b"0" * 5_000 + b"}",
    b'{"prompt": "a cat", "seed": 1e400}',
]


def json_body(fields: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """Encoded bodies: mostly the object, sometimes broken JSON, another JSON value or a hostile body."""
    as_bytes = fields.map(lambda body: json.dumps(body).encode())
    broken = st.one_of(
        as_bytes.map(lambda data: data[: max(1, len(data) // 2)]),
        st.sampled_from(
            [b"", b"null", b"[]", b"123", b'"text"', b"{", b"\xff\xfe", b'{"prompt": NaN}', b'{"prompt": "a", "prompt": 1}']
        ),  # fmt: skip
        junk.map(lambda value: json.dumps(value).encode()),
    )
    # One of eight: six the object, one broken, one hostile (each body draws only the kind it is).
    return st.one_of(*[as_bytes] * 6, broken, st.sampled_from(HOSTILE_JSON))


_tokens = st.text(alphabet=string.ascii_letters + string.digits + "'()+_,-./:=? ", min_size=1, max_size=30)
_field_names = st.one_of(st.sampled_from(["image", "image", "image[]", "mask", "prompt", "n", "size", "model", "stream"]),
                         st.sampled_from(_ODD_NAMES), st.text(max_size=10))  # fmt: skip
_content_types = st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "", "image/png; charset=x",
                                  "multipart/mixed"])  # fmt: skip
_text_values = st.one_of(_schema_value({"type": "string"}, {}), st.integers(-5, 20).map(str), st.sampled_from(["true", "1e9"]))


def _part(boundary: str, name: str, data: bytes, filename: str | None = None, ctype: str = "") -> bytes:
    head = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head += f"\r\nContent-Type: {ctype}" if ctype else ""
    return f"--{boundary}\r\n{head}\r\n\r\n".encode("utf-8", "surrogatepass") + data + b"\r\n"


_boundaries = st.sampled_from(["fuzzboundary", "b", "x" * 70])
_prompt_values = st.sampled_from([b"a cat", "caf\u00e9".encode(), b"x"])
_image_names = st.sampled_from(["image", "image[]"])
_filenames = st.sampled_from(["a.png", "", "../../etc/passwd", "x\r\ny.png", "\u00e9.jpg", 'q"uote.png'])
_field_values = st.one_of(_text_values.map(lambda text: text.encode("utf-8", "surrogatepass")), st.binary(max_size=20))


@st.composite
def multipart_body(draw) -> tuple[str, bytes]:
    """(Content-Type header, body) of a multipart edit or variation, mostly well formed, broken in many ways. (The
    strategies that do not depend on what was drawn are built once, above: building them per body cost more than
    sending it.)"""
    boundary = draw(_boundaries) + str(draw(st.integers(0, 99)))
    parts = []
    if draw(_mostly):  # the parts a client sends: a prompt and an image file
        parts.append(_part(boundary, "prompt", draw(_prompt_values)))
        parts.append(_part(boundary, draw(_image_names), draw(image_bytes), "a.png", "image/png"))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_field_names)
        if draw(st.booleans()):  # a file part
            filename = draw(_filenames)
            parts.append(_part(boundary, name, draw(image_bytes), filename, draw(_content_types)))
        else:
            parts.append(_part(boundary, name, draw(_field_values)))
    parts = draw(st.permutations(parts))
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(_mostly) or not parts else b"")
    if draw(_sometimes):
        body = body[: draw(st.integers(0, len(body)))]  # truncated anywhere
    header_boundary = boundary if draw(_mostly) else draw(st.sampled_from(["other", "", '"' + boundary + '"']))
    content_type = f"multipart/form-data; boundary={header_boundary}" if header_boundary else "multipart/form-data"
    return content_type, body


def check_response(status: int, headers, content: bytes) -> None:
    """Every response of a fuzzed request: no 5xx but a full queue, an OpenAI error envelope on every error."""
    ctype = headers.get("content-type", "")
    if status == 200:
        if ctype.startswith("text/event-stream"):
            assert b"event: " in content, content[:300]
        else:
            body = json.loads(content)
            assert body["data"], body
        return
    assert ctype.startswith("application/json"), (status, ctype, content[:300])
    body = json.loads(content)
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), (status, body)
    assert status < 500 or (status == 503 and error.get("code") == "queue_full"), (status, body)
    assert status >= 400, (status, body)
    assert set(error) >= {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert body["detail"] == error["message"], body
    assert body["request_id"] == headers.get("x-request-id"), body
