"""`deepfleet weights ...` end to end: manifest, verify, keygen, encrypt, decrypt, and failures exit 1 with the file."""

import stat

from typer.testing import CliRunner

from deepfleet.cli import app
from deepfleet.security.crypto import KEY_ENV

runner = CliRunner()


def run(*args, env=None):
    return runner.invoke(app, ["weights", *map(str, args)], env=env)


def test_weights_commands_end_to_end(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00\x01" * 5000)
    (model / "config.json").write_text("{}")
    assert run("manifest", model).exit_code == 0
    assert run("verify", model).exit_code == 0

    key = tmp_path / "sm4.key"
    assert run("keygen", key, "--cipher", "sm4-gcm").exit_code == 0
    assert len(key.read_bytes()) == 16 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert run("keygen", key).exit_code == 1  # never overwrites a key

    assert run("encrypt", model, tmp_path / "enc", "--cipher", "sm4-gcm", "--key-file", key).exit_code == 0
    result = run("decrypt", tmp_path / "enc", tmp_path / "plain", env={KEY_ENV: key.read_bytes().hex()})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    (model / "config.json").write_text('{"changed": true}')
    result = run("verify", model)
    assert result.exit_code == 1 and "config.json: size" in result.output

    wrong = tmp_path / "wrong.key"
    run("keygen", wrong, "--cipher", "sm4-gcm")
    result = run("decrypt", tmp_path / "enc", tmp_path / "plain2", "--key-file", wrong)
    assert result.exit_code == 1 and "config.json.dfenc: wrong key" in result.output
    assert not (tmp_path / "plain2").exists() or not any((tmp_path / "plain2").iterdir())
