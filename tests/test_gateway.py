"""The sites' gateway forwards the Fleet API unchanged and refuses everything else."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from fedrad.server.gateway import REFUSAL, create_gateway

UPSTREAM = "https://127.0.0.1:9093"


@pytest.fixture()
def upstream_calls() -> list[httpx.Request]:
    return []


@pytest.fixture()
def gateway(upstream_calls: list[httpx.Request]) -> TestClient:
    def superlink(request: httpx.Request) -> httpx.Response:
        upstream_calls.append(request)
        return httpx.Response(200, content=b"reply:" + request.content,
                              headers={"content-type": "application/protobuf",
                                       "x-flwr-version": "1.42.0"})

    app = create_gateway(UPSTREAM, max_body=1000,
                         transport=httpx.MockTransport(superlink))
    with TestClient(app) as client:
        yield client


def test_fleet_requests_pass_through_unchanged(gateway: TestClient,
                                               upstream_calls: list[httpx.Request]) -> None:
    body = bytes(range(256))
    response = gateway.post("/v1/fleet/pull-messages", content=body,
                            headers={"content-type": "application/protobuf",
                                     "flwr-supernode-signature": "c2lnbmF0dXJl",
                                     "flwr-timestamp": "2026-01-01T00:00:00"})
    assert response.status_code == 200 and response.content == b"reply:" + body
    assert response.headers["x-flwr-version"] == "1.42.0"
    (call,) = upstream_calls
    assert str(call.url) == f"{UPSTREAM}/v1/fleet/pull-messages"
    assert call.content == body
    assert call.headers["flwr-supernode-signature"] == "c2lnbmF0dXJl"
    assert call.headers["flwr-timestamp"] == "2026-01-01T00:00:00"


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/register-node",
                                  "/v1/runtime/acquire-task", "/v1/fleet/..%2F..%2Fcontrol",
                                  "/v1/fleet//x", "/docs", "/", "/health"])
def test_everything_else_is_refused(gateway: TestClient, upstream_calls: list[httpx.Request],
                                    path: str) -> None:
    response = gateway.post(path, content=b"x")
    assert response.status_code == 403 and not upstream_calls
    assert response.text == REFUSAL


def test_oversized_bodies_and_a_missing_superlink(upstream_calls: list[httpx.Request]) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with TestClient(create_gateway(UPSTREAM, max_body=1000,
                                   transport=httpx.MockTransport(down))) as client:
        assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
        response = client.post("/v1/fleet/push-object", content=b"x" * 1000)
        assert response.status_code == 502 and "not reachable" in response.text
