"""API keys, request ids and the cross-origin policy, on an in-process server that requires a key."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

KEY, FILE_KEY = "sk-test-key-one", "sk-test-key-from-file"
ALLOWED = "https://playground.example"
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def keyed(make_api, tiny_t2i, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    return make_api({"qwen-image-tiny": tiny_t2i}, api_keys=[KEY], api_keys_file=keys_file, cors_origins=[ALLOWED]).client


def _sdk(client, key: str):
    import openai  # here, not at the top: a test process that never runs this module does not import the SDK

    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, max_retries=0, http_client=client)


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_the_openai_sdk_works_with_a_key(keyed):
    client = _sdk(keyed, KEY)
    result = client.images.generate(model="qwen-image-tiny", prompt="a cat", extra_body=FAST)
    assert result.data[0].b64_json


def test_a_missing_or_wrong_key_is_401_in_the_envelope(keyed):
    import openai  # here, not at the top: a test process that never runs this module does not import the SDK

    for headers in ({}, _auth("sk-wrong"), {"Authorization": "Basic abc"}):
        response = keyed.post("/v1/images/generations", json={"prompt": "a cat", **FAST}, headers=headers)
        assert response.status_code == 401, response.text
        body = response.json()
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
        assert response.headers["www-authenticate"] == "Bearer"
    client = _sdk(keyed, "sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_keys_from_the_file_and_the_x_api_key_header_work(keyed):
    assert keyed.get("/v1/models", headers=_auth(FILE_KEY)).status_code == 200
    assert keyed.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200


def test_health_is_open_and_ready_shows_its_detail_only_with_a_key(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/healthz").status_code == 200
    anonymous = keyed.get("/ready")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    detailed = keyed.get("/ready", headers=_auth()).json()
    assert "qwen-image-tiny" in detailed["models"]


def test_stored_images_are_fetched_without_a_key(keyed):
    body = {"prompt": "a cat", "response_format": "url", **FAST}
    url = keyed.post("/v1/images/generations", json=body, headers=_auth()).json()["data"][0]["url"]
    assert keyed.get(url).status_code == 200


def test_request_ids_are_echoed_or_made_and_reach_error_bodies_and_logs(keyed, caplog):
    caplog.set_level(logging.INFO)
    mine = keyed.post(
        "/v1/images/generations",
        json={"prompt": "a cat", "some_unknown_field": 1, **FAST},
        headers={**_auth(), "X-Request-ID": "client-id-42"},
    )
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-id-42"
    assert any(getattr(r, "qis_request_id", None) == "client-id-42" for r in caplog.records), "log lines carry the request's id"
    for bad in ("x" * 200, "two words"):
        made = keyed.get("/v1/models", headers={**_auth(), "X-Request-ID": bad})
        assert made.headers["x-request-id"] != bad and len(made.headers["x-request-id"]) == 32
    error = keyed.post("/v1/images/generations", json={"prompt": ""}, headers={**_auth(), "X-Request-ID": "e-1"})
    assert error.status_code == 400 and error.json()["request_id"] == "e-1"


def test_behind_a_proxy_that_echoes_request_ids_the_app_does_not_echo_them_again(make_api, tiny_t2i):
    """Under Ray, Serve's proxy names every request (the client's X-Request-ID, or a new id it passes on in that
    header) and echoes it on the answer: the app echoing it too sent the header twice ("sdk-1, sdk-1" to the openai
    SDK). An engine behind such a proxy (``proxy_echoes_request_ids``) has the app use the proxy's id and leave the
    header to it; error bodies carry the same id."""
    api = make_api({"tiny": tiny_t2i})
    api.engine.proxy_echoes_request_ids = True
    response = api.client.get("/v1/models/nope", headers={"X-Request-ID": "sdk-1"})
    assert response.status_code == 404 and "x-request-id" not in response.headers
    assert response.json()["request_id"] == "sdk-1"
    api.engine.proxy_echoes_request_ids = False
    response = api.client.get("/v1/models/nope", headers={"X-Request-ID": "sdk-1"})
    assert response.headers.get_list("x-request-id") == ["sdk-1"] and response.json()["request_id"] == "sdk-1"


def test_keys_never_reach_the_logs(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    keyed.get("/v1/models", headers=_auth("sk-wrong-and-secret"))
    keyed.post("/v1/images/generations", json={"prompt": "a cat", **FAST}, headers=_auth())
    logs = caplog.text
    assert KEY not in logs and FILE_KEY not in logs and "sk-wrong-and-secret" not in logs


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_page_from_another_origin_cannot_run_work(keyed):
    """A browser sends a cross-origin multipart POST without asking first: it is refused before any work."""
    response = keyed.post(
        "/v1/images/variations",
        files={"image": ("a.png", _png(), "image/png")},
        headers={**_auth(), "Origin": "https://evil.example"},
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_gets_cors_headers_and_preflights_pass(keyed):
    preflight = keyed.options(
        "/v1/images/generations",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    response = keyed.get("/v1/models", headers={**_auth(), "Origin": ALLOWED})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def _preflight(client, origin: str, method: str = "POST", headers: str = "authorization,content-type", **extra):
    asked = {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}
    return client.options("/v1/images/generations", headers={**asked, **extra})


def test_a_preflight_from_an_origin_not_allowed_gets_the_403_envelope(keyed):
    """With ``--cors-origin`` set, a preflight from another origin is refused as its request would be (README: 403
    ``origin_not_allowed``), in the error envelope, not in CORS's plain text."""
    response = _preflight(keyed, "https://evil.example")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers


def test_the_openai_javascript_sdk_s_preflight_passes_and_reads_the_retry_headers(keyed):
    """The openai npm package sends headers of its own (``x-stainless-*``) with every request, so a browser asks
    about them first; the answer allows them. It also obeys ``X-Should-Retry``, which the page may read."""
    sdk = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count,x-stainless-timeout"
    preflight = _preflight(keyed, ALLOWED, headers=sdk)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert set(preflight.headers["access-control-allow-headers"].lower().split(",")) == set(sdk.split(","))
    response = keyed.get("/v1/models", headers={**_auth(), "Origin": ALLOWED, "x-stainless-os": "Linux"})
    assert response.status_code == 200
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-should-retry", "retry-after", "x-request-id"} <= exposed


def test_a_refused_preflight_of_an_allowed_origin_is_an_enveloped_400(keyed):
    response = _preflight(keyed, ALLOWED, method="DELETE")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "cors_not_allowed" and error["type"] == "invalid_request_error"
    assert error["message"] == "CORS preflight refused: method DELETE (the API takes GET, HEAD, POST, OPTIONS) is not allowed"


def test_a_page_on_the_internet_may_call_a_server_on_a_private_network_it_allows(keyed):
    """Chrome asks before a public page calls a private address (``Access-Control-Request-Private-Network``): an
    origin given to ``--cors-origin`` was allowed to, so the answer says yes."""
    response = _preflight(keyed, ALLOWED, **{"Access-Control-Request-Private-Network": "true"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-private-network"] == "true"


def test_an_origin_given_as_people_write_it_matches_what_browsers_send(make_api, tiny_t2i):
    """``--cors-origin https://App.Example/`` is the origin browsers send as ``https://app.example``: both the request
    and the CORS headers (which compare exactly) take it."""
    api = make_api({"qwen-image-tiny": tiny_t2i}, cors_origins=["https://App.Example/"])
    assert api.settings.cors_origins == ["https://app.example"]
    client = api.client
    response = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/page", "https://", "null", "https://a b.example"])
def test_an_origin_no_browser_could_send_is_refused_at_start(origin):
    from pydantic import ValidationError

    from qwen_image_server.config import Settings

    with pytest.raises(
        ValidationError, match=r"is not a web origin: expected SCHEME://HOST\[:PORT\] \(as https://app.example\) or \*"
    ):
        Settings(cors_origins=[origin])


def test_the_server_s_own_origin_is_allowed(keyed):
    response = keyed.get("/v1/models", headers={**_auth(), "Origin": str(keyed.base_url)})
    assert response.status_code == 200


def test_request_id_logging_leaves_the_request_id_extra_to_other_libraries(caplog):
    """The server's log records carry the request id under a name of its own: a library that passes its own
    ``extra={"request_id": ...}`` (Ray Serve does, in the replica that runs the API) still logs. With the record
    factory writing ``request_id`` itself, Python refused those calls ("Attempt to overwrite 'request_id' in
    LogRecord"), and Ray failed every request cancelled in its ingress replica."""
    from qwen_image_server.api.security import install_request_id_logging, request_id_var

    install_request_id_logging()
    caplog.set_level(logging.INFO)
    library = logging.getLogger("some.library")
    library.info("access line", extra={"request_id": "library-id", "route": "/"})
    token = request_id_var.set("ours-7")
    try:
        logging.getLogger("qwen_image_server.probe").info("our line")
    finally:
        request_id_var.reset(token)
    theirs, ours = caplog.records[-2:]
    assert theirs.getMessage() == "access line" and theirs.request_id == "library-id"
    assert ours.qis_request_id == "ours-7" and theirs.qis_request_id == "-"
