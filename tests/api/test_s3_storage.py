"""url images in an S3-compatible store (a local moto server stands in for S3, MinIO...), from an in-process server."""

from __future__ import annotations

import io
from importlib.util import find_spec

import httpx
import pytest
from PIL import Image

# The test extra installs both; a machine given only the server's wheels (a GPU image) skips this module. Both are
# imported by the fixture, not here: collecting the suite imports this module in every test process.
pytestmark = pytest.mark.skipif(find_spec("boto3") is None or find_spec("moto") is None, reason="needs boto3 and moto")


@pytest.fixture(scope="module")
def s3():
    import boto3
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


def _s3_settings(endpoint: str, presign: bool) -> dict:
    return {
        "s3_bucket": "images", "s3_endpoint_url": endpoint, "s3_region": "us-east-1",
        "s3_access_key_id": "k", "s3_secret_access_key": "s", "s3_prefix": "generated", "s3_presign": presign,
    }  # fmt: skip


@pytest.mark.parametrize("presign", [False, True])
def test_url_images_go_to_the_bucket(make_api, tiny_t2i, s3, presign):
    endpoint, client = s3
    http = make_api({"tiny": tiny_t2i}, **_s3_settings(endpoint, presign)).client
    r = http.post(
        "/v1/images/generations",
        json={"prompt": "a bucket", "response_format": "url", "output_format": "webp", "num_inference_steps": 2},
    )
    assert r.status_code == 200, r.text[:300]
    url = r.json()["data"][0]["url"]
    name = url.split("?")[0].rsplit("/", 1)[1]
    stored = client.get_object(Bucket="images", Key=f"generated/{name}")
    assert stored["ContentType"] == "image/webp"
    if presign:
        assert url.startswith(endpoint) and "Signature" in url
    else:
        assert url == f"{http.base_url}/images/{name}"
    fetched = httpx.get(url, timeout=30) if presign else http.get(url)
    assert fetched.status_code == 200 and fetched.content == stored["Body"].read()
    assert Image.open(io.BytesIO(fetched.content)).format == "WEBP"
    assert http.get(f"/images/{'0' * 32}.png").status_code == 404


def test_a_bucket_that_refuses_the_image_gives_a_clear_500_without_its_name(make_api, tiny_t2i, s3):
    endpoint, _ = s3
    settings = {**_s3_settings(endpoint, False), "s3_bucket": "no-such-bucket-here"}
    http = make_api({"tiny": tiny_t2i}, **settings).client
    body = {"prompt": "a bucket", "response_format": "url", "num_inference_steps": 2}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 500, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "storage_failed" and error["type"] == "server_error"
    assert error["message"] == (
        "Could not store the image for response_format=url (the bucket refused it: NoSuchBucket); "
        "response_format=b64_json returns it without storing it"
    )
    assert "no-such-bucket-here" not in r.text
    assert http.post("/v1/images/generations", json={**body, "response_format": "b64_json"}).status_code == 200


def test_the_images_of_a_response_that_fails_to_store_one_are_deleted_from_the_bucket(make_api, tiny_t2i, s3):
    """A bucket has no bound or expiry of the server's: without lifecycle rules, the images stored before the one that
    failed stayed for ever, under names no client got."""
    import time

    from conftest import failing_store_saves

    endpoint, client = s3
    settings = {**_s3_settings(endpoint, False), "s3_prefix": "fails"}
    api = make_api({"tiny": tiny_t2i}, **settings)
    saves = failing_store_saves(api.client.app.state.service.store, 3, "the bucket refused it: SlowDown")
    body = {"prompt": "a bucket", "response_format": "url", "n": 3, "num_inference_steps": 2}
    r = api.client.post("/v1/images/generations", json=body)
    assert r.status_code == 500 and r.headers["x-should-retry"] == "false", r.text[:300]

    def keys() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket="images", Prefix="fails/").get("Contents", [])]

    deadline = time.monotonic() + 10
    while keys() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(saves) == 3 and keys() == []


def test_presigned_urls_are_signed_with_sigv4(make_api, tiny_t2i, s3):
    """SigV4, which every region and S3-compatible store accepts (botocore signs some regions' URLs with SigV2, which
    AWS is retiring)."""
    endpoint, _ = s3
    http = make_api({"tiny": tiny_t2i}, **_s3_settings(endpoint, True)).client
    r = http.post("/v1/images/generations", json={"prompt": "a bucket", "response_format": "url", "num_inference_steps": 2})
    assert r.status_code == 200, r.text[:300]
    url = r.json()["data"][0]["url"]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Signature=" in url and "AWSAccessKeyId" not in url


def test_an_image_the_bucket_cannot_send_is_a_clear_500_and_a_missing_one_404(make_api, tiny_t2i, s3):
    """``GET /images/NAME`` on a bucket that is gone answers 500 ``storage_failed`` with the store's error code, not
    an internal error with a traceback; a name the bucket does not have is a 404."""
    endpoint, client = s3
    client.create_bucket(Bucket="short-lived")
    http = make_api({"tiny": tiny_t2i}, **{**_s3_settings(endpoint, False), "s3_bucket": "short-lived"}).client
    r = http.post("/v1/images/generations", json={"prompt": "a bucket", "response_format": "url", "num_inference_steps": 2})
    assert r.status_code == 200, r.text[:300]
    url = r.json()["data"][0]["url"]
    assert http.get(f"/images/{'0' * 32}.png").status_code == 404
    for key in client.list_objects_v2(Bucket="short-lived")["Contents"]:
        client.delete_object(Bucket="short-lived", Key=key["Key"])
    client.delete_bucket(Bucket="short-lived")
    for method in ("GET", "HEAD"):
        gone = http.request(method, url)
        assert gone.status_code == 500
        if method == "GET":
            error = gone.json()["error"]
            assert error["code"] == "storage_failed"
            assert error["message"] == "Could not read the stored image (the bucket refused to send it: NoSuchBucket)"
            assert "short-lived" not in gone.text


@pytest.fixture
def stalled_endpoint():
    """An "object store" that accepts connections and never answers."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    listener.close()
    for connection in held:
        connection.close()


def test_a_bucket_that_stops_answering_fails_the_request_within_its_timeout_on_the_stores_threads(
    make_api, tiny_t2i, stalled_endpoint, monkeypatch
):
    """``QIS_S3_TIMEOUT`` bounds a store call (botocore's defaults held a request over 3 minutes), and the calls run
    on the store's own threads: a store that hangs never holds the threads uploads are decoded on."""
    from qwen_image_server import storage

    threads: list[str] = []
    save = storage.S3ImageStore.save

    def recorded(self, *args):
        import threading

        threads.append(threading.current_thread().name)
        return save(self, *args)

    monkeypatch.setattr(storage.S3ImageStore, "save", recorded)
    endpoint, connections = stalled_endpoint
    settings = {**_s3_settings(endpoint, False), "s3_timeout": 0.3}
    http = make_api({"tiny": tiny_t2i}, **settings).client
    r = http.post("/v1/images/generations", json={"prompt": "a bucket", "response_format": "url", "num_inference_steps": 2})
    assert r.status_code == 500, r.text[:300]
    assert r.json()["error"]["message"].startswith(
        "Could not store the image for response_format=url (the object store could not be reached: "
    )
    assert threads and all(name.startswith("image-store-write") for name in threads)
    assert len(connections) == 2  # tried twice (botocore's max_attempts counted retries: three tries)


def test_a_key_the_credentials_may_not_read_is_not_found_and_presigning_without_a_region_is_said(caplog, monkeypatch):
    """S3 answers AccessDenied for a key it does not have when the credentials may not list the bucket (a
    least-privilege policy): every expired image's URL was a 500 with an error line, now a 404. Presigned URLs are
    signed (SigV4) for a region: without one (QIS_S3_REGION, AWS_REGION...; no endpoint of another store) they are
    signed for us-east-1, which a bucket elsewhere refuses: said at start."""
    import logging

    from botocore.stub import Stubber

    from qwen_image_server.storage import S3ImageStore

    store = S3ImageStore("images", region="eu-west-1", access_key_id="k", secret_access_key="s")
    name = "0" * 32 + ".png"
    with Stubber(store.client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        caplog.set_level(logging.INFO)
        assert store.open(name) is None
    assert "AccessDenied" in caplog.text and "credentials without s3:GetObject" in caplog.text  # the first: a warning
    caplog.clear()
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    S3ImageStore("images", presign=True, access_key_id="k", secret_access_key="s")
    assert "presigned URLs are signed (SigV4) for us-east-1, as no region is set" in caplog.text
    caplog.clear()
    S3ImageStore("images", presign=True, region="eu-west-1", access_key_id="k", secret_access_key="s")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # what ECS and EKS set
    S3ImageStore("images", presign=True, access_key_id="k", secret_access_key="s")
    S3ImageStore("images", presign=True, endpoint_url="http://minio:9000", access_key_id="k", secret_access_key="s")
    assert "presigned URLs" not in caplog.text


def test_a_store_error_that_is_no_network_failure_is_not_said_to_be_one():
    """Every client-side error read "the object store could not be reached": missing credentials too."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    from qwen_image_server.storage import _s3_reason

    assert _s3_reason(NoCredentialsError(), "refused") == "the object store's client failed: NoCredentialsError"
    for unreachable in (EndpointConnectionError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3")):
        assert _s3_reason(unreachable, "refused").startswith("the object store could not be reached: ")


def test_an_image_whose_url_cannot_be_presigned_is_deleted_from_the_bucket(make_api, tiny_t2i, s3):
    """Presigning fails after the image was stored (credentials that cannot be fetched): it stayed, named nowhere."""
    import time

    from qwen_image_server.errors import StorageFailed

    endpoint, client = s3
    api = make_api({"tiny": tiny_t2i}, **{**_s3_settings(endpoint, True), "s3_prefix": "unsigned"})
    store = api.client.app.state.service.store

    def cannot_sign(name):
        raise StorageFailed("the bucket's credentials failed: ExpiredToken")

    store.public_url = cannot_sign
    body = {"prompt": "a bucket", "response_format": "url", "num_inference_steps": 2}
    r = api.client.post("/v1/images/generations", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "storage_failed", r.text[:300]
    deadline = time.monotonic() + 10
    while client.list_objects_v2(Bucket="images", Prefix="unsigned/").get("KeyCount") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.list_objects_v2(Bucket="images", Prefix="unsigned/").get("KeyCount") == 0
