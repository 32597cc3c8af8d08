"""The encrypted model served through the host's PKCS#11 token (roles/inference_runtime, tasks/key_store.yml):
the served model directory holds only ciphertext and its manifest, the token store, PIN and wrapped data key
belong to the service user alone, the key-encryption key in the token is sensitive and cannot be extracted,
and the runtime is configured to take its key from the token."""

from __future__ import annotations

import json

import pytest
import yaml

MANIFEST = "deepfleet-manifest.json"  # deepfleet.security.manifest.MANIFEST_NAME: the transfer manifest


@pytest.fixture
def ks(inventory, rendered_settings) -> dict:
    if "gpu_nodes" not in inventory["group_names"]:
        pytest.skip("not a runtime host (group gpu_nodes)")
    rt = rendered_settings("inference_runtime")
    if not rt["inference_runtime_pkcs11"]:
        pytest.skip("inference_runtime_pkcs11 is false: the model is not served through a key store")
    return rt


def as_service_user(ks, command: str) -> str:
    conf = f"{ks['inference_runtime_pkcs11_dir']}/softhsm2.conf"
    return f"runuser -u {ks['inference_runtime_user']} -- env SOFTHSM2_CONF={conf} {command}"


def test_served_model_holds_only_ciphertext_and_its_manifest(host, ks):
    names = host.check_output(f"find -L {ks['inference_runtime_model_dir']}/ -type f -printf '%P\\n'").split()
    plaintext = [n for n in names if not n.endswith(".dfenc") and n != MANIFEST]
    assert plaintext == [], f"plaintext files in the served model: {plaintext}"
    assert MANIFEST in names and f"{MANIFEST}.dfenc" in names and "config.json.dfenc" in names
    assert any(n.endswith(".safetensors.dfenc") for n in names), names


def test_key_material_belongs_to_the_service_user_only(host, ks):
    root = ks["inference_runtime_pkcs11_dir"]
    top = host.file(root)
    assert top.is_directory and top.user == ks["inference_runtime_user"] and top.mode == 0o700
    for name in ("user.pin", "weights.wrapped"):
        f = host.file(f"{root}/{name}")
        assert f.is_file and f.user == ks["inference_runtime_user"] and f.mode == 0o600, name
    readable = host.check_output(f"find {root} -perm /o=rwx")
    assert readable == "", f"readable by other users: {readable}"
    tokens = host.check_output(f"find {root}/tokens -type f").split()
    assert tokens, "the token store is empty"
    assert host.check_output(f"find {root}/tokens -not -user {ks['inference_runtime_user']}") == ""


# Run with the runtime's own venv as the service user: the key's attributes read from the token with python-pkcs11
# itself, and the length of what the runtime's key provider unwraps (the key itself is never printed).
PROBE = """
import json, pkcs11
from pathlib import Path
from deepfleet.security.keys import Pkcs11Settings
from deepfleet.security.pkcs11_store import unwrap_data_key
token = pkcs11.lib({module!r}).get_token(token_label={token!r})
with token.open(user_pin=Path({pin!r}).read_text().strip()) as session:
    kek = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label={key!r})
    attrs = {{"extractable": kek[pkcs11.Attribute.EXTRACTABLE], "sensitive": kek[pkcs11.Attribute.SENSITIVE]}}
cfg = Pkcs11Settings(module={module!r}, token_label={token!r}, key_label={key!r}, wrapped_key_file={wrapped!r},
                     pin_file={pin!r})
print(json.dumps({{**attrs, "unwrapped_bytes": len(unwrap_data_key(cfg))}}))
"""


def test_kek_cannot_leave_the_token_and_unwraps_the_data_key(host, ks):
    root = ks["inference_runtime_pkcs11_dir"]
    probe = PROBE.format(module=ks["inference_runtime_pkcs11_module"], token=ks["inference_runtime_pkcs11_token_label"],
                         key=ks["inference_runtime_pkcs11_key_label"], wrapped=f"{root}/weights.wrapped",
                         pin=f"{root}/user.pin")
    python = f"{ks['inference_runtime_home']}/current/bin/python"
    out = host.run(as_service_user(ks, f"{python} -c %s"), probe)
    assert out.rc == 0, out.stderr
    assert json.loads(out.stdout) == {"extractable": False, "sensitive": True, "unwrapped_bytes": 32}


def test_runtime_takes_its_key_from_the_token(host, ks):
    written = yaml.safe_load(host.file(ks["inference_runtime_config_file"]).content_string)
    root = ks["inference_runtime_pkcs11_dir"]
    assert written["weights"] == {"key_provider": "pkcs11", "pkcs11": {
        "module": ks["inference_runtime_pkcs11_module"], "token_label": ks["inference_runtime_pkcs11_token_label"],
        "key_label": ks["inference_runtime_pkcs11_key_label"], "wrapped_key_file": f"{root}/weights.wrapped",
        "pin_file": f"{root}/user.pin"}}
    env = host.check_output("systemctl show deepfleet-runtime -p Environment --value")
    assert f"SOFTHSM2_CONF={root}/softhsm2.conf" in env.split()
