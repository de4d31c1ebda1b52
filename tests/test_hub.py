"""Whether a name on the command line is a local path or a hub id, and the fast failures when it is neither."""

from __future__ import annotations

import socket

import pytest

from phi3v.errors import RecipeError
from phi3v.hub import looks_like_path, require_folder, require_local_or_reachable

HINT = "`python -m phi3v.tiny --out DIR` writes one."


@pytest.mark.parametrize(
    "name", ["./x", "../x", "/x", "~/x", ".", "a/b/c", "with space", "owner/name/", "C:\\models\\phi"]
)
def test_what_can_only_be_a_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(name)


@pytest.mark.parametrize("name", ["owner/name", "microsoft/Phi-3.5-vision-instruct", "gpt2", "a.b-c_d/e.f"])
def test_what_is_a_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path(name)


def test_owner_slash_name_is_a_path_when_the_owner_folder_exists_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("runs/lora")
    (tmp_path / "runs").mkdir()
    assert looks_like_path("runs/lora")
    assert not looks_like_path("runs")  # one word stays a hub id: it has no owner part


def test_a_file_named_like_the_owner_does_not_make_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    assert not looks_like_path("runs/lora")


def test_an_existing_folder_or_file_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    require_local_or_reachable(str(tmp_path), "--model_name_or_path", HINT)
    (tmp_path / "model.bin").write_bytes(b"x")
    require_local_or_reachable(str(tmp_path / "model.bin"), "--model_name_or_path", HINT)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    require_local_or_reachable("owner/name", "--model_name_or_path", HINT)  # a relative folder, offline too


def test_a_missing_path_is_said_to_be_one(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a path that cannot be a hub id must not reach for the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    missing = tmp_path / "no" / "such"
    with pytest.raises(RecipeError) as raised:
        require_local_or_reachable(str(missing), "--model_name_or_path", HINT)
    assert str(raised.value) == f"--model_name_or_path {missing}: no such folder."


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_a_hub_id_offline_names_the_way_out(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE means no connection attempt")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(RecipeError) as raised:
        require_local_or_reachable("owner/model", "--model_name_or_path", HINT)
    message = str(raised.value)
    assert message.startswith("--model_name_or_path 'owner/model' is not a local folder and HF_HUB_OFFLINE is set.")
    assert message.endswith(f"point --model_name_or_path at a local folder instead: {HINT}")


def test_an_unreachable_hub_is_said_with_its_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def refused(address, timeout):
        asked.append((address, timeout))
        raise OSError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(RecipeError, match=r"the hub \((.+)\) cannot be reached: connection refused") as raised:
        require_local_or_reachable("owner/model", "--dataset_name_or_path", HINT)
    host = asked[0][0][0]
    assert asked == [((host, 443), 3)] and f"({host})" in str(raised.value)
    assert HINT in str(raised.value)


def test_a_reachable_hub_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
    require_local_or_reachable("owner/model", "--model_name_or_path", HINT)


def test_require_folder(tmp_path):
    assert require_folder(str(tmp_path), "--model") == tmp_path
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(RecipeError) as raised:
        require_folder(file, "--model")
    assert str(raised.value) == f"--model {file}: not a folder."
    with pytest.raises(RecipeError) as raised:
        require_folder(tmp_path / "gone", "run folder", " Train a run first.")
    assert str(raised.value) == f"run folder {tmp_path / 'gone'}: no such folder. Train a run first."
