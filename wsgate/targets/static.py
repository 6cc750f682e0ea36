"""``static = DIR``: small files for plain GET requests (the demo page), read at start-up."""

import mimetypes
import os
from dataclasses import dataclass, field

from twisted.internet.protocol import Protocol
from zope.interface import implementer

from wsgate import http, units
from wsgate.interfaces import ITarget
from wsgate.settings import SettingError
from wsgate.targets import TargetType

_WEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")


@implementer(ITarget)
@dataclass(frozen=True)
class StaticTarget:
    """Serve the files of a directory to plain GET requests (read once, at load)."""

    directory: str
    files: dict = field(compare=False, repr=False)  # relative path → (bytes, content type)
    type = "static"
    websocket = False
    needs_shared_broker = False

    def describe(self):
        return f"static {self.directory}"

    def lookup(self, tail):
        """The (body, content type) for the request's tail, or None."""
        return self.files.get(tail or "index.html")

    def accept(self, request):
        """The file for the request's tail, then close (no keep-alive); 404 otherwise."""
        found = self.lookup(request.match.tail)
        if found is None or request.head.wants_websocket:
            raise http.HttpRefusal(404, "no_route", "Not Found", route=request.route.name)
        body, ctype = found
        return _Response(http.render_file(body, ctype, request.head.method == "HEAD"))


_STATIC_LIMIT = 8 * 1024 * 1024


def load(value, base):
    """``DIR`` (relative to the config file) or ``@name``: a directory bundled with wsgate."""
    if value.startswith("@"):
        directory = os.path.join(_WEB, value[1:])
    else:
        directory = value if os.path.isabs(value) else os.path.join(base, value)
    if not os.path.isdir(directory):
        raise SettingError("static", f"expected a directory, {directory} is not one")
    files, total = {}, 0
    for root, _, names in os.walk(directory):
        for filename in sorted(names):
            path = os.path.join(root, filename)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError as e:
                raise SettingError("static", f"cannot read {path}: {e.strerror}") from None
            total += len(body)
            if total > _STATIC_LIMIT:
                raise SettingError("static", f"{directory} holds more than 8 MiB: static "
                                   "routes are for small pages (files are kept in memory)")
            ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript",
                                                      "application/json"):
                ctype += "; charset=utf-8"
            files[relative] = (body, ctype)
    return StaticTarget(value, files)


class _Response(Protocol):
    """Writes one whole HTTP response, then closes."""

    def __init__(self, response):
        self.response = response

    def connectionMade(self):
        self.transport.write(self.response)
        self.transport.loseConnection()

    def dataReceived(self, data):
        pass  # the request (already read) and anything after it


def build(route, settings, context):
    if not context.path.prefix:
        raise SettingError("path", "a static route needs a /prefix/* path")
    return load(settings.get("static", units.non_empty), context.config_dir)


static = TargetType("static", ("static",), build)
