"""`magnetar download` against a local imitation of the Hugging Face hub.

The fake hub, served on loopback, answers what huggingface_hub asks (HEAD on
/{repo}/resolve/{rev}/{file}, redirected to a "CDN" host the way the real hub does for
LFS files) and serves the bytes with Range support. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
from huggingface_hub import constants as hf_constants

from magnetar.agent import download as dl
from magnetar.agent.models import KNOWN
from magnetar.runtime.errors import MagnetarError

DATA = os.urandom(6000)  # the "gguf"
NAME = "mtp"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.files = {dl.REMOTE[NAME]: DATA}
        self.sha = hashlib.sha256(DATA).hexdigest()  # what the hub claims
        self.drop_next_get = False  # cut the next download half way
        self.repo = dl.REPO_ID  # tests may point the client elsewhere
        self.requests: list[tuple[str, str, object]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        # A different host name for the same server, like the hub's CDN.
        self.cdn = f"http://localhost:{self.server.server_port}/cdn"

    def gets(self, prefix="/cdn/"):
        return [h for m, p, h in self.requests if m == "GET" and p.startswith(prefix)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer()

            def do_GET(self):
                self._answer()

            def _reply(self, status, headers, body=b""):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, str(value))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _answer(self):
                path = unquote(self.path)
                hub.requests.append((self.command, path, self.headers))  # case-insensitive
                resolve = f"/{hub.repo}/resolve/{dl.REVISION}/"
                if path.startswith(resolve):
                    name = path[len(resolve):]
                    if name not in hub.files:
                        return self._reply(404, {"X-Error-Code": "EntryNotFound", "Content-Length": 0})
                    self._reply(302, {"Location": f"{hub.cdn}/{name}", "X-Repo-Commit": COMMIT,
                                      "ETag": '"gitblobsha"', "X-Linked-Etag": f'"{hub.sha}"',
                                      "X-Linked-Size": len(hub.files[name]), "Content-Length": 0})
                elif path.startswith("/cdn/") and path[5:] in hub.files:
                    self._serve(hub.files[path[5:]])
                else:
                    self._reply(404, {"X-Error-Code": "RepoNotFound", "Content-Length": 0})

            def _serve(self, data):
                start = int(self.headers["Range"][6:].rstrip("-")) if self.headers["Range"] else 0
                headers = {"Content-Length": len(data) - start, "Accept-Ranges": "bytes"}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if self.command == "GET" and hub.drop_next_get:
                    hub.drop_next_get = False
                    self._reply(206 if start else 200, headers, data[start:start + (len(data) - start) // 2])
                    self.close_connection = True  # the rest never comes
                    return
                self._reply(206 if start else 200, headers, data[start:])

        return Handler


@pytest.fixture
def hub(monkeypatch):
    for var in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # huggingface_hub writes what arrives in 10 MB chunks and drops a cut chunk; at 1000 bytes this
    # 6000-byte file streams in several chunks, as a real 80 GB file does in 10 MB ones.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1000)
    fake = FakeHub()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def run(hub, tmp_path, name=NAME, **extra):
    return dl.download(argparse.Namespace(name=name, dir=str(tmp_path), endpoint=hub.endpoint, **extra))


def test_download_lands_exact_bytes_then_second_run_is_a_no_op(hub, tmp_path, capsys):
    assert run(hub, tmp_path) == 0
    final = tmp_path / KNOWN[NAME][0]
    assert final.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # no .part left behind
    assert "sha256 verified" in capsys.readouterr().out

    assert run(hub, tmp_path) == 0
    assert "already downloaded" in capsys.readouterr().out
    assert len(hub.gets()) == 1


def test_hf_endpoint_from_the_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert dl.download(argparse.Namespace(name=NAME, dir=str(tmp_path))) == 0
    assert (tmp_path / KNOWN[NAME][0]).read_bytes() == DATA


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    hub.drop_next_get = True
    assert run(hub, tmp_path) == 0
    assert (tmp_path / KNOWN[NAME][0]).read_bytes() == DATA
    ranges = [h.get("Range") for h in hub.gets()]
    assert ranges == [None, f"bytes={len(DATA) // 2}-"]


def test_partial_file_from_an_earlier_run_is_continued(hub, tmp_path):
    (tmp_path / (KNOWN[NAME][0] + ".part")).write_bytes(DATA[:1000])
    assert run(hub, tmp_path) == 0
    assert (tmp_path / KNOWN[NAME][0]).read_bytes() == DATA
    assert [h.get("Range") for h in hub.gets()] == ["bytes=1000-"]


def test_checksum_mismatch_is_refused_and_leaves_nothing(hub, tmp_path):
    hub.sha = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(MagnetarError, match="sha256"):
        run(hub, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_token_stays_on_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert run(hub, tmp_path) == 0
    head = next(h for m, p, h in hub.requests if m == "HEAD")
    assert head.get("Authorization") == "Bearer hf_secret"
    assert "Authorization" not in hub.gets()[0]


def test_not_enough_disk_space_fails_before_any_byte(hub, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(MagnetarError) as err:
        run(hub, tmp_path)
    assert f"{len(DATA):,} more bytes" in str(err.value) and "100 bytes" in str(err.value)
    assert "\n" not in str(err.value)
    assert hub.gets() == []


def test_missing_repository_is_a_clear_error(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "REPO_ID", "nobody/nothing")
    with pytest.raises(MagnetarError, match="repository nobody/nothing not found"):
        run(hub, tmp_path)


def test_missing_file_and_unknown_name_are_clear_errors(hub, tmp_path):
    hub.files = {}
    with pytest.raises(MagnetarError, match="not found in"):
        run(hub, tmp_path)
    with pytest.raises(MagnetarError, match="unknown model"):
        run(hub, tmp_path, name="q8")


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_port
    server.server_close()  # nothing listens there now
    with pytest.raises(MagnetarError, match="cannot reach"):
        dl.download(argparse.Namespace(name=NAME, dir=str(tmp_path), endpoint=f"http://127.0.0.1:{port}"))
