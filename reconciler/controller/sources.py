"""Where the controller service gets its specs, and which revision of them it converges to.

The service loop (`reconciler run`) calls `poll(source, tracker)` at an interval. A source
hands back a `Revision`: an id and a directory on disk holding exactly that revision's specs,
ready for `load_directory`.

    SpecSource (protocol)
    ├── DirectorySource   a specs directory as it is now; the id is a digest of its YAML files,
    │                     so any edit gives a new revision; also a `WatchedSource`: its
    │                     `stamp()` (stat only, no content read) lets the service notice an
    │                     edit within a second instead of at the next poll
    └── GitSource         a branch of a git repository, fetched into a bare mirror; only
                          committed content is ever materialized, one checkout per commit

`RevisionTracker` remembers the last revision that validated (the one to converge to) and the
last one that did not, with its diagnostics (the one to report). A revision whose specs do not
validate is never returned as a target, not even in part: the loop keeps converging to the last
good one. If the very first revision is bad there is no target at all. A hostile revision (an
alias bomb, a link out of the spec folder, a file of a gigabyte) is a bad revision like any
other: the loader bounds its work, and `load_revision` never raises.

Failures while fetching use our own exceptions (`reconciler.model.errors`):
`TemporaryError` when the remote cannot be reached (try again next interval),
`ConfigurationError` when the branch or the spec folder does not exist, or git refuses the
credentials (waiting will not fix either).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio.to_thread

from reconciler.controller.logs import fields
from reconciler.loading.loader import (
    SPEC_SUFFIXES,
    LoadResult,
    list_spec_files,
    load_directory,
    outside_link,
)
from reconciler.loading.sources import LIMITS, OPEN_SPEC_FLAGS
from reconciler.model.diagnostics import Diagnostic, Position, error
from reconciler.model.errors import ConfigurationError, TemporaryError

log = logging.getLogger(__name__)

# --- revisions and sources -------------------------------------------------------------------


@dataclass(frozen=True)
class Revision:
    """One version of the specs, materialized on disk."""

    id: str
    """A git commit sha, or `dir-<12 hex>` for a directory (a digest of its YAML files)."""
    directory: Path
    """Where this revision's specs are, ready for `load_directory`."""
    summary: str
    """The commit subject, or "working tree of <path>"."""
    committed_at: str | None = None
    """The commit's date (ISO 8601) for git; None for a directory."""
    display: str = ""
    """How file names appear in diagnostics (`<sha12>:specs`); the directory when empty."""
    refused: tuple[tuple[str, str], ...] = ()
    """Links the checkout left out, as (path under `directory`, where the link led): they
    lead out of the spec folder, and `load_revision` reports each."""


class SpecSource(Protocol):
    def describe(self) -> str:
        """A one-line description for status and logs. Never includes credentials."""
        ...

    async def fetch(self) -> Revision:
        """The newest revision. Raises TemporaryError or ConfigurationError."""
        ...

    def retain(self, ids: Iterable[str]) -> None:
        """Revisions whose directories must stay on disk (the current and the last good)."""
        ...


@runtime_checkable
class WatchedSource(Protocol):
    """A source cheap enough to look at every second (a local directory): the service asks
    for a poll as soon as its `stamp()` changes, instead of waiting out the source interval."""

    def describe(self) -> str: ...

    def stamp(self) -> str:
        """Changes when the specs may have changed; cheap (no content read). Never raises."""
        ...


class DirectorySource:
    """A specs directory as it is: what a person edits is what the controller sees."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"directory {self.path}"

    async def fetch(self) -> Revision:
        return await anyio.to_thread.run_sync(self._fetch)

    def retain(self, ids: Iterable[str]) -> None:
        """Nothing to keep: a directory has only its present state."""

    def stamp(self) -> str:
        """The spec files' stat, hashed: path, link text, and the size, inode, device,
        modification and change times of what each leads to (so a ConfigMap's swapped link
        counts). Stat only: an edit, an added, removed or relinked file changes it. Blocking
        (a walk of the folder): call it from a worker thread."""
        digest = hashlib.sha256()
        try:
            for found in list_spec_files(self.path):
                facts: tuple[int | None, ...]
                try:
                    st = os.stat(found.path)
                    facts = (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
                except OSError as exc:
                    facts = (exc.errno,)
                digest.update(repr((found.rel, found.link, facts)).encode())
        except OSError as exc:  # the folder itself went away: the poll reports it
            digest.update(f"unreadable: {exc.errno}".encode())
        return digest.hexdigest()

    def _fetch(self) -> Revision:
        if not self.path.is_dir():
            raise ConfigurationError(f"spec directory {self.path} does not exist")
        return Revision(
            id=directory_id(self.path),
            directory=self.path,
            summary=f"working tree of {self.path}",
        )


def directory_id(directory: Path) -> str:
    """`dir-` and 12 hex digits of a sha256 over the spec files' relative paths and contents.

    The same files `load_directory` reads (hidden folders skipped, nothing outside the
    directory), so an edit to any of them, an added or a removed file, or a link changed
    changes the id, and nothing else does. A file over the loader's size limit, which the
    loader refuses unread, counts by its size and time instead: a poll never reads 1 GB.
    """
    digest = hashlib.sha256()
    for found in list_spec_files(directory):
        rel = found.rel.encode()
        if found.refused is not None:
            content = f"\0refused {found.refused.code}: {found.link}".encode()
        else:
            content = _file_digest(found.path)
        if found.link is not None:  # pointing a link elsewhere is a new revision
            rel += f"\0-> {found.link}".encode()
        # Lengths first, so no two different sets of files can hash the same stream.
        digest.update(b"%d:%s%d:" % (len(rel), rel, len(content)))
        digest.update(content)
    return f"dir-{digest.hexdigest()[:12]}"


def _file_digest(path: Path) -> bytes:
    try:
        with os.fdopen(os.open(path, OPEN_SPEC_FLAGS), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > LIMITS.file_bytes:
                # Still a revision: load_directory reports the file as a diagnostic.
                return f"\0unread: {info.st_mode} {info.st_size} {info.st_mtime_ns}".encode()
            return hashlib.sha256(f.read(LIMITS.file_bytes + 1)).digest()
    except OSError as exc:
        return f"\0unreadable: {exc}".encode()


# --- git -------------------------------------------------------------------------------------

_FETCH_TIMEOUT = 300.0
_LOCAL_TIMEOUT = 60.0
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?\Z")
# git's messages when the branch is not there, and when the server refuses who we are.
_MISSING_REF = ("couldn't find remote ref",)
_AUTH_FAILED = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "permission denied (publickey",
    "http basic: access denied",
)


def redact_url(url: str) -> str:
    """The URL without secrets: a password becomes `***`, and so does an http(s) user name
    given alone (hosting services accept a token there). `git@host:path` stays as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if not parts.scheme or "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    if has_password:
        shown = f"{user}:***"
    elif parts.scheme in ("http", "https"):
        shown = "***"
    else:
        shown = user
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def _scrub(text: str, url: str) -> str:
    # git may echo the URL it was given; never let a token reach a log through an error.
    text = text.replace(url, redact_url(url))
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", text)


# A git credential helper (run by git through the shell, with "get", "store" or "erase"): on
# "get" it prints what the environment of this one command holds. The token is in no argument.
_HELPER = (
    "!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' "
    '"$RECONCILER_GIT_USERNAME" "$RECONCILER_GIT_PASSWORD"; }; f'
)
_REFUSED = ".refused-links.json"  # beside the spec folder in a checkout: hidden, never a spec


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """An http(s) URL without its userinfo, and the (user, password) it held, decoded; other
    URLs as they are, but for a password (ssh never takes one from the URL)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    if parts.scheme in ("http", "https"):
        bare = urlunsplit(parts._replace(netloc=host))
        return bare, (unquote(user), unquote(password))
    if has_password:
        return urlunsplit(parts._replace(netloc=f"{user}@{host}")), None
    return url, None


class GitSource:
    """A branch of a git repository, mirrored under `workdir` and materialized per commit.

    Layout under `workdir`:

        mirror.git/            bare repository; only `refs/heads/<branch>` is fetched into it
        checkouts/<sha>/       `git archive` of that commit's `subdir`, never a working tree
        checkouts/.tmp-*       an extraction in progress, renamed into place when complete

    A checkout is extracted once and reused for every later fetch of the same commit. After each
    fetch, checkouts beyond the `keep` most recent are deleted, except the ids given to
    `retain` (the tracker's current and last good revision).

    Credentials in an http(s) URL (`https://user:token@host/repo.git`) are never written to
    disk: the mirror's remote is the URL without them, and a fetch gets them from a credential
    helper configured for that command only, through its environment (never its arguments,
    which any local user can read), scoped to that host, with every other helper switched off
    so none of them stores the token. Both directories are 0700.

    Links: a checkout never holds a link out of the spec folder. Such a link is left out and
    recorded in `Revision.refused`, so the revision is reported, not quietly missing a file.
    """

    def __init__(
        self,
        url: str,
        *,
        branch: str = "main",
        subdir: str = "specs",
        workdir: Path | str,
        keep: int = 3,
        timeout: float = _FETCH_TIMEOUT,
    ) -> None:
        self.url = url
        self._remote_url, self._credentials = _split_credentials(url)
        self.branch = branch
        self.subdir = PurePosixPath(subdir).as_posix().strip("/") if subdir not in ("", ".") else ""
        self.workdir = Path(workdir).absolute()
        self.keep = max(1, keep)
        self.timeout = timeout
        self._mirror = self.workdir / "mirror.git"
        self._checkouts = self.workdir / "checkouts"
        self._retained: set[str] = set()
        self._recent: list[str] = []  # checkout ids, oldest first
        self._started = False
        # fetch runs in worker threads; two at once would race on the mirror and the checkouts.
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = self.subdir or "."
        return f"git {redact_url(self.url)} branch {self.branch} dir {where}"

    async def fetch(self) -> Revision:
        return await anyio.to_thread.run_sync(self._fetch)

    def retain(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._retained = {i for i in ids if _SHA.match(i)}
            self._prune()

    # The rest runs in a worker thread, under the lock.

    def _fetch(self) -> Revision:
        with self._lock:
            if not self._started:
                self._start()
            self._git(["fetch", "--quiet", "--no-tags", "origin", self._refspec()], remote=True)
            sha = self._git(
                ["rev-parse", "--verify", f"refs/heads/{self.branch}^{{commit}}"]
            ).strip()
            directory, refused = self._materialize(sha)
            committed_at, summary = (
                self._git(["log", "-1", "--format=%cI%x00%s", sha]).rstrip("\n").split("\0", 1)
            )
            self._prune()
            where = self.subdir or "."
            return Revision(
                id=sha,
                directory=directory,
                summary=summary,
                committed_at=committed_at,
                display=f"{sha[:12]}:{where}",
                refused=refused,
            )

    def _refspec(self) -> str:
        return f"+refs/heads/{self.branch}:refs/heads/{self.branch}"

    def _start(self) -> None:
        """Create the mirror (or point an existing one at our URL) and tidy what a previous
        process left: half-made extractions, and the order of the checkouts it made."""
        if self._credentials is not None:
            user, password = self._credentials
            if any(c in user + password for c in "\n\0"):
                raise ConfigurationError(
                    f"the credentials in {redact_url(self.url)} hold a newline or a NUL"
                )
        self._checkouts.mkdir(parents=True, exist_ok=True)
        if not (self._mirror / "HEAD").is_file():
            # init + fetch rather than `clone --bare`: only our branch, the same path as later.
            shutil.rmtree(self._mirror, ignore_errors=True)
            self._git(["init", "--quiet", "--bare", str(self._mirror)], cwd=self.workdir)
            self._git(["remote", "add", "origin", self._remote_url])
        else:
            # Also takes a token out of the config of a mirror made before it was kept out.
            self._git(["remote", "set-url", "origin", self._remote_url])
        # Only the service's user reads the mirror and the checkouts (workdir may be shared).
        for private in (self._mirror, self._checkouts):
            private.chmod(0o700)
        for path in self._checkouts.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
        existing = [p for p in self._checkouts.iterdir() if _SHA.match(p.name)]
        self._recent = [p.name for p in sorted(existing, key=lambda p: p.stat().st_mtime_ns)]
        self._started = True

    def _materialize(self, sha: str) -> tuple[Path, tuple[tuple[str, str], ...]]:
        target = self._checkouts / sha
        if not target.is_dir():
            kind = self._git(["cat-file", "-t", f"{sha}:{self.subdir}"], check=False).strip()
            if kind != "tree":
                raise ConfigurationError(
                    f"{self.subdir or '.'} is not a folder at {sha[:12]} "
                    f"(branch {self.branch} of {redact_url(self.url)})"
                )
            args = ["archive", "--format=tar", sha]
            if self.subdir:
                args += ["--", self.subdir]
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self._checkouts))
            try:
                # Through a file, not memory: a commit may hold a file of any size (the loader
                # refuses it unread, but git archive has to write it somewhere).
                with tempfile.TemporaryFile(dir=self._checkouts) as tar:
                    self._git_bytes(args, stdout=tar)
                    tar.seek(0)
                    refused = self._extract(tar, staging)
                (staging / _REFUSED).write_text(json.dumps(refused), encoding="utf-8")
                # A complete checkout appears at once, so its presence means "done".
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        if sha in self._recent:
            self._recent.remove(sha)
        self._recent.append(sha)
        try:
            listed = json.loads((target / _REFUSED).read_text(encoding="utf-8"))
            refused_links = tuple((str(a), str(b)) for a, b in listed)
        except (OSError, ValueError, TypeError):
            refused_links = ()
        return (target / self.subdir if self.subdir else target), refused_links

    def _extract(self, tar: IO[bytes], staging: Path) -> list[tuple[str, str]]:
        """Extract the archive into `staging`, leaving out every link that leads out of the spec
        folder; return those that are spec files, as (path under the folder, link text).

        A link is kept only if its text stays in the folder and tarfile's "data" filter, which
        resolves it against what is already extracted, agrees; the loader checks again where
        each link really leads before it reads anything."""
        base = PurePosixPath(self.subdir) if self.subdir else PurePosixPath()
        refused: list[tuple[str, str]] = []

        def leave_out(member: tarfile.TarInfo) -> None:
            rel = PurePosixPath(member.name).relative_to(base)
            hidden = any(part.startswith(".") for part in rel.parts)
            if rel.suffix in SPEC_SUFFIXES and not hidden:  # what the loader would have read
                refused.append((rel.as_posix(), member.linkname))

        def keep(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
            link = member.issym() or member.islnk()
            if link:
                parent = str(PurePosixPath(member.name).parent)
                led = posixpath.normpath(posixpath.join(parent, member.linkname))
                if not (
                    member.issym()
                    and not posixpath.isabs(member.linkname)
                    and not led.startswith("..")
                    and PurePosixPath(led).is_relative_to(base)
                ):
                    leave_out(member)
                    return None
            try:
                # "data": no absolute paths, no links out of the checkout, no devices.
                return tarfile.data_filter(member, dest)
            except tarfile.FilterError:
                if not link:
                    raise
                leave_out(member)  # inside by its text, out through another link
                return None

        try:
            with tarfile.open(fileobj=tar) as archive:
                archive.extractall(staging, filter=keep)
        except tarfile.TarError as exc:
            raise TemporaryError(f"cannot extract {self.subdir or '.'}: {exc}") from exc
        return sorted(refused)

    def _prune(self) -> None:
        keep = set(self._recent[-self.keep :]) | self._retained
        for sha in [s for s in self._recent if s not in keep]:
            shutil.rmtree(self._checkouts / sha, ignore_errors=True)
            self._recent.remove(sha)

    def _env(self, *, remote: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        # Never wait for a password nobody will type; read git's messages in one language.
        env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", LANGUAGE="C")
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        if remote and self._credentials is not None:
            user, password = self._credentials
            # Config for this command only (git >= 2.31): an empty helper clears the list, so no
            # helper of the user's or the system's is asked, or told to store the token; then
            # ours, for this host only, which prints the credentials from the environment.
            n = int(env.get("GIT_CONFIG_COUNT", "0") or "0")
            host = urlsplit(self._remote_url)
            for i, (key, value) in enumerate(
                (
                    ("credential.helper", ""),
                    (f"credential.{host.scheme}://{host.netloc}.helper", _HELPER),
                ),
                start=n,
            ):
                env[f"GIT_CONFIG_KEY_{i}"] = key
                env[f"GIT_CONFIG_VALUE_{i}"] = value
            env["GIT_CONFIG_COUNT"] = str(n + 2)
            env["RECONCILER_GIT_USERNAME"] = user
            env["RECONCILER_GIT_PASSWORD"] = password
        return env

    def _git(
        self, args: list[str], *, cwd: Path | None = None, remote: bool = False, check: bool = True
    ) -> str:
        return self._git_bytes(args, cwd=cwd, remote=remote, check=check).decode("utf-8", "replace")

    def _git_bytes(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        remote: bool = False,
        check: bool = True,
        stdout: IO[bytes] | None = None,
    ) -> bytes:
        """Run git; its output, or nothing when it goes to `stdout`."""
        command = ["git", *args] if cwd is not None else ["git", f"--git-dir={self._mirror}", *args]
        try:
            proc = subprocess.run(
                command,
                cwd=cwd,
                env=self._env(remote=remote),
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=self.timeout if remote else _LOCAL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TemporaryError(
                f"git {args[0]} from {redact_url(self.url)} timed out after {exc.timeout:.0f}s"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot run git: {exc}") from exc
        if proc.returncode == 0 or not check:
            return proc.stdout or b""
        # One line for status and logs: git spreads a refusal over several, with blank ones.
        lines = proc.stderr.decode("utf-8", "replace").splitlines()
        message = _scrub("; ".join(line.strip() for line in lines if line.strip()), self.url)
        message = message or f"git {args[0]} exited with status {proc.returncode}"
        lowered = message.lower()
        if remote and any(m in lowered for m in _MISSING_REF):
            raise ConfigurationError(
                f"branch {self.branch} does not exist in {redact_url(self.url)}: {message}"
            )
        if remote and any(m in lowered for m in _AUTH_FAILED):
            raise ConfigurationError(f"{redact_url(self.url)} refused our credentials: {message}")
        if remote:
            raise TemporaryError(f"cannot fetch {redact_url(self.url)}: {message}")
        # A local git command failing means the mirror is damaged: start it afresh next time.
        self._started = False
        shutil.rmtree(self._mirror, ignore_errors=True)
        raise TemporaryError(f"git {args[0]} failed in {self._mirror}: {message}")


# --- which revision to converge to ------------------------------------------------------------


def render_diagnostics_text(diags: Iterable[Diagnostic]) -> str:
    """One diagnostic a line, as `reconciler validate` prints them without color (the CLI's
    renderer sits above this layer)."""
    return "".join(f"{d}\n" for d in diags)


@dataclass(frozen=True)
class BadRevision:
    revision: Revision
    diagnostics: tuple[Diagnostic, ...]

    @property
    def text(self) -> str:
        return render_diagnostics_text(self.diagnostics)


@dataclass(frozen=True)
class SourceStatus:
    """What the loop reports about its specs: which revision it saw, which it converges to."""

    source: str
    current_id: str | None
    good_id: str | None
    bad_id: str | None
    bad_diagnostics: str
    fetch_error: str | None

    @property
    def healthy(self) -> bool:
        """The newest revision validated, is the target, and the last fetch worked."""
        return (
            self.current_id is not None
            and self.current_id == self.good_id
            and not (self.fetch_error)
        )

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "current": self.current_id,
            "good": self.good_id,
            "bad": self.bad_id,
            "bad_diagnostics": self.bad_diagnostics or None,
            "fetch_error": self.fetch_error,
            "healthy": self.healthy,
        }


@dataclass
class RevisionTracker:
    """The last good revision (validated: the target) and the last bad one (reported).

    A bad revision is recorded, never made the target. A good one newer than a bad one clears
    it: the error has been fixed. `poll` does not load the same id twice in a row.

    Converge to `good_result` (the specs as they validated), not to a fresh read of
    `good.directory`: for a `DirectorySource` that directory is live and may hold a bad edit now.
    """

    source: str = ""
    current: Revision | None = None
    good: Revision | None = None
    good_result: LoadResult | None = None
    bad: BadRevision | None = None
    fetch_error: str | None = None

    def seen(self, revision: Revision) -> bool:
        return self.current is not None and self.current.id == revision.id

    def record(self, revision: Revision, result: LoadResult) -> None:
        self.current = revision
        self.fetch_error = None
        if result.ok:
            self.good, self.good_result, self.bad = revision, result, None
        else:
            self.bad = BadRevision(revision, tuple(result.diagnostics))

    def record_fetch_error(self, exc: Exception) -> None:
        self.fetch_error = f"{type(exc).__name__}: {exc}"

    def target(self) -> Revision | None:
        """What to converge to: the last good revision, or None if none has validated yet."""
        return self.good

    def retained_ids(self) -> set[str]:
        return {r.id for r in (self.current, self.good) if r is not None}

    def status(self) -> SourceStatus:
        return SourceStatus(
            source=self.source,
            current_id=self.current.id if self.current else None,
            good_id=self.good.id if self.good else None,
            bad_id=self.bad.revision.id if self.bad else None,
            bad_diagnostics=self.bad.text if self.bad else "",
            fetch_error=self.fetch_error,
        )


async def load_revision(revision: Revision) -> LoadResult:
    """Load a revision's specs in a worker thread (reading and validating YAML blocks).

    Links the checkout left out are reported as the loader reports a link out of a directory.
    Loading never raises: should it fail all the same, the revision is bad, reported with the
    failure, and the loop keeps converging to the last good one."""
    display = revision.display or None
    shown = display if display is not None else str(revision.directory)
    refused = [outside_link(f"{shown}/{rel}", target) for rel, target in revision.refused]

    def load() -> LoadResult:
        try:
            return load_directory(revision.directory, display=display, problems=refused)
        except Exception as exc:  # a loader bug must not stop the loop, nor pass a revision
            log.exception("loading the specs failed", extra=fields(revision=revision.id))
            failed = error(
                "load-failed",
                f"the specs could not be loaded: {type(exc).__name__}",
                position=Position(shown),
            )
            return LoadResult(None, [*refused, failed])

    return await anyio.to_thread.run_sync(load)


async def poll(source: SpecSource, tracker: RevisionTracker) -> Revision | None:
    """Fetch the newest revision, validate it if new, record it; return the target.

    A fetch error is recorded in the tracker and raised again, so the loop can log it and
    keep converging to `tracker.target()` until the next interval.
    """
    tracker.source = source.describe()
    try:
        revision = await source.fetch()
    except (TemporaryError, ConfigurationError) as exc:
        tracker.record_fetch_error(exc)
        raise
    if tracker.seen(revision):
        tracker.fetch_error = None
    else:
        tracker.record(revision, await load_revision(revision))
    source.retain(tracker.retained_ids())
    return tracker.target()
