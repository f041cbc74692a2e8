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


def test_sizes_scaled_to_the_side_limits_keep_the_ratio_and_stay_within_limits_that_are_no_multiples_of_16(tmp_path):
    from qwen_image_server.serving.sizes import SizeRules

    rules = SizeRules(Settings(image_output_dir=tmp_path))
    assert rules.at_area(256, 192, 256 * 256) == (336, 256)  # 4:3 at 256x256, scaled up until the short side is 256
    assert rules.at_area(6000, 1000, 1024 * 1024) == (2048, 336)  # 6:1 at 1 MP, scaled down until the long side fits
    odd = SizeRules(Settings(image_output_dir=tmp_path, min_image_side=260, max_image_side=2040))
    assert odd.at_area(4000, 500, 1024 * 1024) == (2032, 272) and odd.at_area(400, 300, 256 * 256) == (352, 272)
