"""Jobs, sizes and seeds as the serving layer derives them (no engine needed)."""

import pytest

from qwen_image_server.config import Settings
from qwen_image_server.errors import InvalidRequest
from qwen_image_server.jobs import Job
from qwen_image_server.protocol.images import GenerationRequest
from qwen_image_server.serving.service import ImageService, Size


class _NoEngine:
    models: list = []


@pytest.fixture
def service(tmp_path):
    return ImageService(Settings(image_output_dir=tmp_path), _NoEngine(), store=None)


def _size(service, default="1024x1024", **fields):
    return service.resolve_size(GenerationRequest(prompt="p", **fields), default)


def test_sizes(service):
    assert _size(service) == Size(1024, 1024, 1024, 1024)
    assert _size(service, size="auto", default="256x256") == Size(256, 256, 256, 256)
    assert _size(service, size="512x768") == Size(512, 768, 512, 768)
    assert _size(service, aspect_ratio="16:9") == Size(1664, 928, 1664, 928)
    assert _size(service, aspect_ratio="4:3") == Size(1472, 1152, 1472, 1140)
    assert _size(service, width=1664, height=928, size="256x256", aspect_ratio="1:1") == Size(1664, 928, 1664, 928)
    assert _size(service, default=None) is None


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"size": "big"}, "size"),
        ({"size": "1000x1000"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"size": "128x128"}, "size"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"width": 512}, "height"),
        # each field given must be valid, also when another one wins over it
        ({"aspect_ratio": "1:1", "size": "bogus"}, "size"),
        ({"width": 256, "height": 256, "size": "garbage"}, "size"),
        ({"width": 256, "height": 256, "aspect_ratio": "garbage"}, "aspect_ratio"),
        ({"aspect_ratio": "16:9", "size": "4096x4096"}, "size"),
    ],
)
def test_bad_sizes(service, fields, param):
    with pytest.raises(InvalidRequest) as info:
        _size(service, **fields)
    assert info.value.param == param


def test_split_keeps_seed_order():
    job = Job(mode="generate", prompt="p", seeds=[7, 8, 9, 10, 11])
    assert [piece.seeds for piece in job.split(2)] == [[7, 8], [9, 10], [11]]
    assert [piece.seeds for piece in job.split(1)] == [[7], [8], [9], [10], [11]]
