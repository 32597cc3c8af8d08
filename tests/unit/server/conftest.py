"""Server test fixtures: one tiny model per session (`deepfleet make-tiny-model`'s function) and a shared real
server per module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import LiveServer, live_server, settings_for

from deepfleet.models.tiny import make_tiny_model

# a named template beside the default, as transformers saves a dict of templates
TOOL_TEMPLATE = "{{ bos_token }}TOOLS:{{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[LiveServer]:
    """The shared real server: real engine, real tiny model, room for the concurrency tests."""
    with live_server(settings_for(tiny_model, max_concurrent=64, max_queue=512)) as s:
        yield s


@pytest.fixture(scope="session")
def saved_dir(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer re-saved by transformers' own save_pretrained, with a named tool template."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("saved") / "tiny-saved"
    shutil.copytree(tiny_model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = {"default": tok.chat_template, "tool_use": TOOL_TEMPLATE}
    tok.save_pretrained(out)
    return out
