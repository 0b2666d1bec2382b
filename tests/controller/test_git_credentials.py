"""A git URL with a token: fetched with it, never stored with it.

Real git against a real smart-HTTP server (`git http-backend` behind a small HTTP server that
asks for Basic credentials), so the test shows both halves: the token reaches the server, and
nothing under the mirror holds it (the remote URL in .git/config is the URL without it), nor
does any credential store of the user's, and the mirror is readable by its owner only.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest

from reconciler.controller.sources import GitSource, RevisionTracker, poll
from reconciler.model.errors import ConfigurationError
from tests.conftest import SPECS
from tests.controller.test_sources import git

USER = "x-access-token"
TOKEN = "ghp_T0kenThatMustNeverBeStored1234"


@dataclass
class GitServer:
    root: Path
    user: str
    password: str
    url: str = ""
    authorizations: list[str | None] = field(default_factory=list)


def serve_git(server: GitServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.backend()

        def do_POST(self) -> None:
            self.backend()

        def backend(self) -> None:
            auth = self.headers.get("Authorization")
            server.authorizations.append(auth)
            expected = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
            if auth != f"Basic {expected}":
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": server.user,
                "REMOTE_ADDR": "127.0.0.1",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            out = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
            ).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode().split("\r\n"):
                key, _, value = line.partition(":")
                if key.lower() == "status":
                    status = int(value.split()[0])
                elif key:
                    headers.append((key, value.strip()))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME whose git config stores every credential it is given, in plain text."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return home


@pytest.fixture
def remote(tmp_path: Path, home: Path) -> Iterator[GitServer]:
    root = tmp_path / "served"
    root.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "--quiet", "-b", "main")
    shutil.copytree(SPECS, work / "specs")
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "-m", "the platform")
    git(root, "clone", "--quiet", "--bare", str(work), "platform.git")
    server = GitServer(root, USER, TOKEN)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), serve_git(server))
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}/platform.git"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def with_token(url: str, user: str = USER, token: str = TOKEN) -> str:
    return url.replace("http://", f"http://{user}:{token}@")


def every_file_under(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def test_the_token_is_sent_but_stored_nowhere(
    remote: GitServer, home: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "git"
    source = GitSource(with_token(remote.url), branch="main", subdir="specs", workdir=workdir)
    tracker = RevisionTracker()

    target = anyio.run(poll, source, tracker)

    assert target is not None, tracker.status()
    assert tracker.good is not None and tracker.good.id == target.id
    sent = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    assert sent in remote.authorizations  # the credentials did reach the server
    config = (workdir / "mirror.git" / "config").read_text()
    assert remote.url in config
    for path in every_file_under(workdir):
        data = path.read_bytes()
        assert TOKEN.encode() not in data, f"{path} holds the token"
        assert base64.b64encode(f"{USER}:{TOKEN}".encode()) not in data, path
    assert not (home / ".git-credentials").exists(), "the user's credential store got the token"
    for private in (workdir / "mirror.git", workdir / "checkouts"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, private
    assert TOKEN not in source.describe()


def test_a_mirror_made_with_the_token_in_its_config_loses_it(
    remote: GitServer, tmp_path: Path
) -> None:
    """A mirror an older version made (`remote add origin <url with token>`, 0755)."""
    workdir = tmp_path / "git"
    (workdir / "checkouts").mkdir(parents=True)
    mirror = workdir / "mirror.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(mirror)], check=True)
    subprocess.run(
        ["git", f"--git-dir={mirror}", "remote", "add", "origin", with_token(remote.url)],
        check=True,
    )
    mirror.chmod(0o755)

    source = GitSource(with_token(remote.url), branch="main", subdir="specs", workdir=workdir)
    assert anyio.run(poll, source, RevisionTracker()) is not None

    assert TOKEN not in (mirror / "config").read_text()
    assert stat.S_IMODE(mirror.stat().st_mode) == 0o700


def test_a_token_given_alone_as_the_user_name_works_too(remote: GitServer, tmp_path: Path) -> None:
    """`https://<token>@host/...`: GitHub and GitLab take a token as the user name."""
    remote.user, remote.password = TOKEN, ""
    url = remote.url.replace("http://", f"http://{TOKEN}@")
    source = GitSource(url, branch="main", subdir="specs", workdir=tmp_path / "git")
    assert anyio.run(poll, source, RevisionTracker()) is not None
    assert TOKEN not in (tmp_path / "git" / "mirror.git" / "config").read_text()


def test_a_wrong_token_is_a_configuration_error_that_never_shows_it(
    remote: GitServer, tmp_path: Path
) -> None:
    wrong = "ghp_WrongTokenAlsoSecret5678"
    source = GitSource(
        with_token(remote.url, token=wrong), branch="main", subdir="specs", workdir=tmp_path / "g"
    )
    tracker = RevisionTracker()
    with pytest.raises(ConfigurationError) as caught:
        anyio.run(poll, source, tracker)
    assert "refused our credentials" in str(caught.value)
    assert wrong not in str(caught.value)
    assert tracker.fetch_error is not None and wrong not in tracker.fetch_error


def test_without_credentials_nothing_is_configured_for_them(tmp_path: Path) -> None:
    """A URL without userinfo runs git with the environment as it is (no helper of ours)."""
    source = GitSource("https://example.invalid/x.git", workdir=tmp_path / "g")
    env = source._env(remote=True)
    assert "RECONCILER_GIT_PASSWORD" not in env
    assert env.get("GIT_CONFIG_COUNT") == os.environ.get("GIT_CONFIG_COUNT")
