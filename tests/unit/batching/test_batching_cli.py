"""`deepfleet serve-models` / `example-models` wiring, and readiness before the models are loaded."""

import httpx
import pytest
from typer.testing import CliRunner

from deepfleet.batching.app import create_app
from deepfleet.batching.service import ModelService
from deepfleet.cli import app


def test_commands_are_registered():
    out = CliRunner().invoke(app, ["--help"]).output
    assert "serve-models" in out and "example-models" in out


def test_bad_repository_is_refused_with_the_reason(tmp_path):
    result = CliRunner().invoke(app, ["serve-models", str(tmp_path / "missing")])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert "Invalid value for REPOSITORY" in text and "model repository directory not found" in text


@pytest.mark.asyncio
async def test_not_ready_until_started(example_repo):
    service = ModelService.from_repository(example_repo)
    transport = httpx.ASGITransport(app=create_app(service))  # no lifespan: the models are not loaded yet
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).json() == {"ready": False}
        r = await client.post("/v2/models/classifier/infer", json={"inputs": []})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert (await client.get("/v2/models/nope/ready")).status_code == 404
        await service.start()
        assert (await client.get("/v2/health/ready")).status_code == 200
        await service.stop()
