"""url images in an S3-compatible store (a local moto server stands in for S3, MinIO...)."""

from __future__ import annotations

import io

import boto3
import httpx
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    client.create_bucket(Bucket="images")
    yield endpoint, client
    server.stop()


def _env(endpoint: str, presign: bool) -> dict[str, str]:
    return {
        "QIS_S3_BUCKET": "images", "QIS_S3_ENDPOINT_URL": endpoint, "QIS_S3_REGION": "us-east-1",
        "QIS_S3_ACCESS_KEY_ID": "k", "QIS_S3_SECRET_ACCESS_KEY": "s", "QIS_S3_PREFIX": "generated",
        "QIS_S3_PRESIGN": "true" if presign else "false", "QIS_CPU_THREADS": "2",
    }  # fmt: skip


@pytest.mark.parametrize("presign", [False, True])
def test_url_images_go_to_the_bucket(start_server, tiny_t2i, s3, presign):
    endpoint, client = s3
    server = start_server("--model", f"tiny={tiny_t2i}", env=_env(endpoint, presign))
    r = httpx.post(
        server.base_url + "/v1/images/generations",
        json={"prompt": "a bucket", "response_format": "url", "output_format": "webp", "num_inference_steps": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text[:300]
    url = r.json()["data"][0]["url"]
    name = url.split("?")[0].rsplit("/", 1)[1]
    stored = client.get_object(Bucket="images", Key=f"generated/{name}")
    assert stored["ContentType"] == "image/webp"
    if presign:
        assert url.startswith(endpoint) and "Signature" in url
    else:
        assert url == f"{server.base_url}/images/{name}"
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content == stored["Body"].read()
    assert Image.open(io.BytesIO(fetched.content)).format == "WEBP"
    assert httpx.get(f"{server.base_url}/images/{'0' * 32}.png").status_code == 404
