"""``wsgate publish`` and ``wsgate connections``: thin clients of the admin HTTP API.

They send one request with ``twisted.web.client.Agent`` (``Authorization:
Bearer TOKEN`` when a token is given) and print what the admin endpoint
answered. Exit status: 0 on a 2xx answer, 1 on any other answer, 2 when the
admin endpoint cannot be reached (or answers nothing in time).
"""

import datetime
import io
import json
import sys
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet import defer

from wsgate.cli.check import table

EXIT_OK = 0
EXIT_ANSWERED_ERROR = 1
EXIT_UNREACHABLE = 2

DEFAULT_ADMIN = "http://127.0.0.1:8081"
TOKEN_ENV = "WSGATE_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminRequest:
    """One call of the admin API."""

    method: str
    url: str
    body: bytes = None
    content_type: str = None


@dataclass(frozen=True)
class AdminAnswer:
    status: int
    phrase: str
    body: bytes

    @property
    def ok(self):
        return 200 <= self.status < 300

    def text(self):
        return self.body.decode("utf-8", "replace").rstrip("\n")


def from_config(path):
    """``(admin URL, token)`` from the ``[admin]`` section of the config file at *path*.

    Raises ``ValueError`` (one line) when the file is not a valid config, has no
    ``[admin]``, or its endpoint cannot be reached over TCP from here (``unix:``,
    port 0). The token is the config's (``token`` or ``token_file``), or None.
    """
    from wsgate.config import ConfigError
    from wsgate.config.parse import parse

    try:
        settings = parse(path).admin
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if settings is None:
        raise ValueError(f"{path}: has no [admin] section (the admin endpoint is off)")
    return endpoint_url(settings.endpoint, path), settings.token


def endpoint_url(endpoint, where="the config"):
    """The http(s) URL to reach a ``tcp:``/``tcp6:``/``ssl:`` server endpoint string locally."""
    parts = endpoint.replace("\\:", "\0").split(":")
    scheme, args = parts[0], parts[1:]
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    port = options.get("port") or (positional[0] if positional else "")
    if scheme not in ("tcp", "tcp6", "ssl") or not port.isdigit() or port == "0":
        raise ValueError(f"{where}: the admin endpoint {endpoint} cannot be reached over TCP "
                         "from here; give --admin URL")
    host = options.get("interface", "").replace("\0", ":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if scheme == 'ssl' else 'http'}://{host}:{port}"


def admin_base(url):
    """Check ``--admin`` and return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or not url.isascii():
        raise ValueError(f"--admin expects an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def publish_request(admin, channel, message, binary=False):
    """``POST /publish/{channel}`` with the message as the body."""
    if not channel:
        raise ValueError("the channel name is empty")
    content_type = "application/octet-stream" if binary else "text/plain; charset=utf-8"
    return AdminRequest("POST", f"{admin_base(admin)}/publish/{quote(channel, safe=':@')}",
                        message, content_type)


def list_request(admin):
    return AdminRequest("GET", f"{admin_base(admin)}/connections")


def kick_request(admin, connection_id, code=None, reason=None):
    """``DELETE /connections/{id}``, with ``?code=&reason=`` when given."""
    url = f"{admin_base(admin)}/connections/{quote(connection_id, safe='')}"
    query = {key: value for key, value in (("code", code), ("reason", reason))
             if value is not None}
    if query:
        url += "?" + urlencode(query)
    return AdminRequest("DELETE", url)


def message_from(argument, stdin, binary):
    """The message to publish: the argument, or standard input for ``-`` or none.

    From standard input, one trailing line ending is dropped for text
    (``echo hello | wsgate publish room:a`` publishes ``hello``).
    """
    if argument is not None and argument != "-":
        return argument.encode("utf-8", "surrogateescape")
    data = stdin.read()
    if binary:
        return data
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("standard input is not UTF-8 text (use --binary)") from None
    return data


# ------------------------------------------------------------------ the request


def send(reactor, request, token=None, timeout=10.0):
    """Send *request*; fire with an :class:`AdminAnswer` or fail (unreachable)."""
    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    headers = Headers({b"User-Agent": [b"wsgate-cli"]})
    if token:
        headers.addRawHeader(b"Authorization", b"Bearer " + token.encode("utf-8"))
    producer = None
    if request.body is not None:
        headers.addRawHeader(b"Content-Type", request.content_type.encode("ascii"))
        producer = FileBodyProducer(io.BytesIO(request.body))
    agent = Agent(reactor, connectTimeout=timeout)
    d = agent.request(request.method.encode("ascii"), request.url.encode("ascii"),
                      headers, producer)

    def got_response(response):
        body = readBody(response)
        body.addCallback(lambda data: AdminAnswer(
            response.code, response.phrase.decode("latin-1"), data))
        return body

    d.addCallback(got_response)
    d.addTimeout(timeout, reactor)
    return d


def describe_unreachable(failure):
    """Why the admin endpoint gave no answer, in a few words."""
    from twisted.internet.error import TimeoutError
    from twisted.web.client import ResponseFailed, ResponseNeverReceived

    value = failure.value
    if isinstance(value, (defer.CancelledError, TimeoutError)):
        return "no answer in time"
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)) and value.reasons:
        inner = value.reasons[0]
        return inner.getErrorMessage() or inner.value.__class__.__name__
    return failure.getErrorMessage() or value.__class__.__name__


def call(reactor, request, token, timeout, on_answer, out=None, err=None):
    """Send *request*, print through *on_answer* (2xx) or as an error; fire with the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr

    def answered(answer):
        if answer.ok:
            on_answer(answer, out)
            out.flush()
            return EXIT_OK
        err.write(f"wsgate: the admin API answered {answer.status} {answer.phrase}"
                  + (f": {answer.text()}" if answer.body.strip() else "") + "\n")
        return EXIT_ANSWERED_ERROR

    def unreachable(failure):
        err.write(f"wsgate: cannot reach the admin API at {request.url}: "
                  f"{describe_unreachable(failure)}\n")
        return EXIT_UNREACHABLE

    d = send(reactor, request, token, timeout)
    d.addCallbacks(answered, unreachable)
    return d


# ------------------------------------------------------------------ printing


def print_body(answer, out):
    """What the endpoint answered, as it answered it."""
    text = answer.text()
    if text:
        out.write(text + "\n")


def print_connections(answer, out):
    """``GET /connections`` as a table (the raw JSON if it is not the expected shape)."""
    try:
        connections = json.loads(answer.body)["connections"]
        rows = [_connection_row(item) for item in connections]
    except (ValueError, KeyError, TypeError, AttributeError):
        print_body(answer, out)
        return
    if not rows:
        out.write("no connections\n")
        return
    out.write(table(["ID", "ROUTE", "CLIENT", "IDENTITY", "SINCE", "MESSAGES IN/OUT",
                     "BYTES IN/OUT"], rows))


def _connection_row(item):
    return [
        str(item["id"]),
        _cell(item.get("route")),
        _cell(item.get("client")),
        _cell(item.get("identity")),
        _since(item.get("since")),
        f"{_cell(item.get('messages_in'))}/{_cell(item.get('messages_out'))}",
        f"{_cell(item.get('bytes_in'))}/{_cell(item.get('bytes_out'))}",
    ]


def _cell(value):
    return "-" if value is None else str(value)


def _since(value):
    """A Unix time as ISO 8601 UTC; anything else (already a string) as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return _cell(value)
