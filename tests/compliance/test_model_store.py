"""What roles/model_store leaves on the hosts whose model comes from the object store: the served revision
complete and matching its SHA256 manifest, readable by the runtime's group only, no partial transfer beside it,
the store credentials root-only, and the site cache serving the revision."""

from __future__ import annotations

import pytest


@pytest.fixture
def store(host, rendered_settings) -> dict:
    rt = rendered_settings("inference_runtime")
    if rt["inference_runtime_model_source"] != "objectstore":
        pytest.skip("model not from the object store (inference_runtime_model_source)")
    return {**rt, **rendered_settings("model_store")}


def test_served_revision_is_the_declared_one(host, store):
    current = host.file(f"{store['inference_runtime_model_root']}/current")
    assert current.is_symlink and current.linked_to == f"{store['inference_runtime_model_root']}/" \
        f"{store['model_store_revision']}"


def test_served_revision_matches_its_manifest(host, store):
    deepfleet = f"{store['inference_runtime_home']}/current/bin/deepfleet"
    out = host.run(f"{deepfleet} weights verify {store['inference_runtime_model_root']}/current/")
    assert out.rc == 0, out.stderr
    assert "all files match the manifest" in out.stdout


def test_weights_readable_by_the_runtime_group_only(host, store):
    root = store["inference_runtime_model_root"]
    group = store["inference_runtime_group"]
    wrong = host.check_output(
        f"find {root}/ -mindepth 1 -not -type l \\( -not -user root -o -not -group {group} "
        f"-o -type f -not -perm 0640 -o -type d -not -perm 0750 \\) -print")
    assert wrong == "", f"owner/mode not root:{group} 0640 (files) / 0750 (folders): {wrong}"


def test_no_partial_transfer_left(host, store):
    leftovers = host.check_output(f"find {store['inference_runtime_model_root']} -maxdepth 1 -name '.incoming-*'")
    assert leftovers == ""


def test_store_credentials_root_only(host, store):
    conf = host.file(store["model_store_rclone_config"])
    assert conf.exists and conf.user == "root" and conf.group == "root" and conf.mode == 0o600


def test_site_cache_serves_the_revision(host, store):
    if host.backend.get_hostname() != store["model_store_cache_host"] \
            and host.ansible.get_variables().get("inventory_hostname") != store["model_store_cache_host"]:
        pytest.skip("not the site cache host (model_store_cache_host)")
    assert host.service("deepfleet-model-cache").is_running
    url = (f"http://127.0.0.1:{store['model_store_cache_port']}/{store['inference_runtime_model_name']}/"
           f"{store['model_store_revision']}/deepfleet-manifest.json")
    code = host.check_output(f"python3 -c \"import urllib.request as u; print(u.urlopen('{url}').status)\"")
    assert code == "200"
