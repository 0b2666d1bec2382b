"""Redis connections from a URL: one place that turns the operator's `--redis` URL (command line or
environment, never a spec) into a redis.asyncio client, and that prints such a URL safely.

Called by the controller service (`reconciler run`) for its leader lease
(`reconciler.controller.lease.RedisLease`), and by anything else that needs the controller's
Redis. Accepted URLs:

    redis://[[user]:password@]host[:port][/db][?option=value...]      plain TCP
    rediss://...                                                       TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]                 a local socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master-name>[/<db>]

The first three go to `redis.asyncio.from_url` (its query options, such as `socket_timeout`,
win over ours). `redis+sentinel` asks the listed sentinels (port 26379 by default) for the
current master of <master-name> and follows failovers; the user and password are the master's,
the sentinels are asked without a password, and the URL takes no query options.

Every client is built with redis-py's own retries off (`retry=Retry(NoBackoff(), 0)`): they
sleep for real, outside the caller's own retry policy and its injected sleep. Socket and connect
timeouts are `timeout` seconds (default 5), short enough that a lease renewal never hangs for
long.

A URL may carry a password (the operator's own setting); `describe_redis_url` replaces it with
`***` for logs and status, and no error raised here echoes it.

Errors (reconciler.model.errors):

    ConfigurationError    a URL we cannot use: unknown scheme, no sentinel host or master name,
                          a bad port or db, a password both in the URL and as `password`
"""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from reconciler.model.errors import ConfigurationError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")
HIDDEN = "***"


def describe_redis_url(url: str) -> str:
    """The URL with any password (in the user part or a `password=` query option) as `***`."""
    if "://" not in url:
        # Not a URL at all, perhaps a password pasted into the wrong setting: show nothing of it.
        return "<not a URL>"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + HIDDEN
        netloc = f"{userinfo}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, HIDDEN if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect_redis(url: str, *, password: str | None = None, timeout: float = 5.0) -> Redis:
    """A client for `url` (see the module docstring), without connecting yet: the first command
    connects. `password` is for a password kept out of the URL (an environment variable); giving
    one in both places is refused. Close the client with `await client.aclose()`."""
    shown = describe_redis_url(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if scheme == SENTINEL_SCHEME:
        return _connect_sentinel(url, shown, password, options)
    if scheme not in PLAIN_SCHEMES:
        raise ConfigurationError(
            f"Redis URL {shown}: the scheme must be one of redis://, rediss://, unix://, "
            f"{SENTINEL_SCHEME}://"
        )
    url_password = _url_password(url, shown)
    if password is not None:
        if url_password is not None:
            raise ConfigurationError(f"Redis URL {shown}: a password both in the URL and given")
        options["password"] = password
    try:
        _check_port(urlsplit(url), shown)
        return Redis.from_url(url, **options)
    except ValueError as exc:
        # redis-py's messages name the option, not its value; scrub the password all the same.
        raise ConfigurationError(
            f"Redis URL {shown}: {_scrub(str(exc), url_password, password)}"
        ) from None


class _SentinelRedis(Redis):
    """A master client found through sentinels; closing it closes the sentinel clients too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        try:
            await super().aclose(close_connection_pool)
        finally:
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def _connect_sentinel(url: str, shown: str, password: str | None, options: dict[str, Any]) -> Redis:
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in netloc:
        raise ConfigurationError(f"Redis URL {shown}: {SENTINEL_SCHEME} URLs take no options")
    username: str | None = None
    url_password: str | None = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        url_password = unquote(secret) if has_password else None
    if password is not None and url_password is not None:
        raise ConfigurationError(f"Redis URL {shown}: a password both in the URL and given")
    sentinels = [_sentinel_address(item, shown) for item in netloc.split(",")]
    segments = path.split("/") if path else []
    if not segments or not segments[0]:
        raise ConfigurationError(
            f"Redis URL {shown}: name the master: {SENTINEL_SCHEME}://host:port/<master-name>"
        )
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ConfigurationError(
            f"Redis URL {shown}: after the master name only a db number may follow"
        )
    master = unquote(segments[0])
    master_options = dict(options)
    if len(segments) == 2:
        master_options["db"] = int(segments[1])
    if username is not None:
        master_options["username"] = username
    if (password or url_password) is not None:
        master_options["password"] = password if password is not None else url_password
    # The sentinels get the same short timeouts and no retries, but not the master's password.
    # redis-py leaves Sentinel's constructor unannotated.
    sentinel = Sentinel(sentinels, sentinel_kwargs=dict(options))  # type: ignore[no-untyped-call,unused-ignore]
    client: Redis = sentinel.master_for(master, redis_class=_SentinelRedis, **master_options)
    return client


def _sentinel_address(item: str, shown: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise ConfigurationError(f"Redis URL {shown}: an empty sentinel address")
    if item.startswith("["):  # [IPv6]:port
        host, _, port_text = item[1:].partition("]")
        port_text = port_text.removeprefix(":")
    elif item.count(":") == 1:
        host, port_text = item.split(":")
    else:
        host, port_text = item, ""
    if not host:
        raise ConfigurationError(f"Redis URL {shown}: a sentinel address without a host")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"Redis URL {shown}: a bad sentinel port {port_text!r}")
    return host, int(port_text)


def _url_password(url: str, shown: str) -> str | None:
    try:
        parts = urlsplit(url)
        secret = parts.password
    except ValueError:
        raise ConfigurationError(f"Redis URL {shown}: not a URL") from None
    if secret is not None:
        return unquote(secret)
    query = dict(parse_qsl(parts.query))
    return query.get("password")


def _check_port(parts: SplitResult, shown: str) -> None:
    # urlsplit checks the port lazily, and its message quotes the port text only.
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise ConfigurationError(f"Redis URL {shown}: a bad port") from None


def _scrub(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, HIDDEN)
    return text
