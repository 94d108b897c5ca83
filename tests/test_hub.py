"""Pushing an export to the Hub, against a local HTTP server that answers like the Hub and records every request."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from huggingface_hub import HfApi

from conftest import TINY_RUN, TOKEN, commits, committed_files, make_image_folders
from van_app.cli import main, push_main
from van_app.files import EXPORT_FILES
from van_app.hub import HubError, push_export


def local_api(server, token: str = TOKEN) -> HfApi:
    """A real huggingface_hub client talking to ``server``."""
    return HfApi(endpoint=f"http://127.0.0.1:{server.server_port}", token=token)


def test_van_push_creates_the_repo_then_commits_once(trained, hub, monkeypatch, capsys):
    _, out, _ = trained
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_main([str(out), "alice/pets", "--private"]) == 0
    result = capsys.readouterr()
    calls = [r for r in hub.requests if r["path"] in ("/api/repos/create", "/api/models/alice/pets/commit/main")]
    assert [r["path"] for r in calls] == ["/api/repos/create", "/api/models/alice/pets/commit/main"]
    assert json.loads(calls[0]["body"]) == {"name": "pets", "organization": "alice", "visibility": "private",
                                            "type": "model"}
    assert {r["auth"] for r in calls} == {f"Bearer {TOKEN}"}
    assert "alice/pets" in result.out and TOKEN not in result.out + result.err


def test_commit_holds_every_export_file_and_a_card_naming_the_repo(trained, hub):
    _, out, _ = trained
    push_export(out, "alice/pets", api=local_api(hub))
    files = committed_files(commits(hub)[0])
    assert sorted(files) == sorted(EXPORT_FILES)
    assert all(files[name] == (out / name).read_bytes() for name in EXPORT_FILES if name != "README.md")
    card = files["README.md"].decode()
    assert 'van_app.load_model("alice/pets")' in card and '"hf-hub:alice/pets"' in card
    assert 'load_model("export")' in (out / "README.md").read_text()  # the local card is left as it was


def test_checkpoints_and_logs_are_never_uploaded(trained, hub, tmp_path):
    _, out, _ = trained
    export = shutil.copytree(out, tmp_path / "export")
    (export / "stray.ckpt").write_bytes(b"pickle")
    (export / "checkpoints").mkdir()
    (export / "checkpoints" / "last.ckpt").write_bytes(b"pickle")
    (export / "logs").mkdir()
    (export / "logs" / "metrics.csv").write_text("step,loss\n")
    push_export(export, "alice/pets", api=local_api(hub))
    assert sorted(committed_files(commits(hub)[0])) == sorted(EXPORT_FILES)


def test_push_refuses_an_incomplete_export_naming_what_is_missing(trained, hub, tmp_path):
    _, out, _ = trained
    export = shutil.copytree(out, tmp_path / "export")
    (export / "README.md").unlink()
    (export / "metrics.json").unlink()
    with pytest.raises(HubError, match=r"incomplete van_app export, missing metrics.json, README.md"):
        push_export(export, "alice/pets", api=local_api(hub))
    assert not hub.requests


def test_van_push_refuses_a_malformed_repo_id_in_one_line(trained, capsys):
    _, out, _ = trained
    with pytest.raises(SystemExit) as exit_:
        push_main([str(out), "not a repo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_token_is_written_to_no_file(trained):
    _, out, _ = trained
    assert not [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_push_without_token_fails_in_one_line(trained, hub, monkeypatch, capsys):
    _, out, _ = trained
    monkeypatch.setattr("van_app.hub.get_token", lambda: None)
    before = sorted(p.name for p in out.iterdir())
    assert push_main([str(out), "alice/pets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token") and err.count("\n") == 1
    assert not hub.requests and sorted(p.name for p in out.iterdir()) == before


def test_unreachable_hub_fails_in_one_line(trained):
    _, out, _ = trained
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match=r"^push to alice/pets failed: [^\n]+$"):
        push_export(out, "alice/pets", api=HfApi(endpoint=f"http://127.0.0.1:{port}", token=TOKEN))
    assert (out / "model.safetensors").is_file()


def test_push_refuses_a_folder_that_is_not_an_export(hub, tmp_path):
    with pytest.raises(HubError, match="not a van_app export"):
        push_export(tmp_path, "alice/pets", api=local_api(hub))
    assert not hub.requests


def test_finetune_without_token_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("van_app.hub.get_token", lambda: None)
    data = make_image_folders(tmp_path / "pets", classes=("cat", "dog"), per_class=3)
    out = tmp_path / "run"
    assert main(["--data", str(data), *TINY_RUN, "--output", str(out), "--push-to-hub", "alice/pets"]) == 2
    assert capsys.readouterr().err.startswith("error: no Hugging Face token")
    assert not out.exists()
