"""SHA256 manifests name the file that is missing, changed or unexpected."""

import json

import pytest

from deepfleet.security.manifest import MANIFEST_NAME, ManifestError, sha256_file, verify_manifest, write_manifest


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 5000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.json").write_text("{}")
    (tmp_path / "sub" / MANIFEST_NAME).write_text("{}")  # only the top-level manifest is exempt
    return tmp_path


def test_manifest_lists_every_file_sorted_with_size_and_sha256(model_dir):
    path = write_manifest(model_dir)
    assert path == model_dir / MANIFEST_NAME
    files = json.loads(path.read_text())["files"]
    assert list(files) == sorted(files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        f"sub/{MANIFEST_NAME}",
        "sub/tokenizer.json",
    ]
    shard = model_dir / "model-00001-of-00002.safetensors"
    assert files[shard.name] == {"sha256": sha256_file(shard), "size": 25600}
    verify_manifest(model_dir)
    write_manifest(model_dir)  # rewriting must not list the manifest itself
    verify_manifest(model_dir)


def test_changed_byte_with_same_size_is_named(model_dir):
    write_manifest(model_dir)
    shard = model_dir / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[4000] ^= 1
    shard.write_bytes(data)
    with pytest.raises(ManifestError, match=r"model-00002-of-00002\.safetensors: sha256 mismatch") as e:
        verify_manifest(model_dir)
    assert len(e.value.problems) == 1


def test_missing_unexpected_and_resized_files_are_all_named(model_dir):
    write_manifest(model_dir)
    (model_dir / "config.json").unlink()
    (model_dir / "extra.bin").write_bytes(b"x")
    with open(model_dir / "model-00001-of-00002.safetensors", "ab") as f:
        f.write(b"!")
    with pytest.raises(ManifestError) as e:
        verify_manifest(model_dir)
    assert e.value.problems == [
        "config.json: missing",
        "extra.bin: unexpected (not in the manifest)",
        "model-00001-of-00002.safetensors: size 25601 != 25600 in the manifest",
    ]


@pytest.mark.parametrize("content", [None, "not json", '{"version": 1}', '{"version": 9, "files": {}}'])
def test_missing_or_malformed_manifest_is_an_error(model_dir, content):
    if content is not None:
        (model_dir / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        verify_manifest(model_dir)
