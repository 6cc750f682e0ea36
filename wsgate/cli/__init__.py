"""The ``wsgate`` operator command: parse the command line, run one command, return its status.

Commands: ``check`` (validate a config as start-up does; :mod:`wsgate.cli.check`),
``connect`` (an interactive WebSocket client; :mod:`wsgate.cli.connect`),
``publish`` and ``connections`` (clients of the admin HTTP API;
:mod:`wsgate.cli.admin`). This module only parses the command line and runs the
command; the clients run on the Twisted reactor through
:func:`twisted.internet.task.react`. ``check`` and ``connect`` are imported when
they run (the config machinery, Autobahn), so the other commands and ``--help``
start quickly.

Entry points: the ``wsgate`` console script (``wsgate.cli:main``) and
``python -m wsgate.cli``.
"""

import argparse
import os
import sys

from wsgate import DEFAULT_CONFIG, __version__, units  # the same default as twistd's
from wsgate.cli import admin
from wsgate.frames import kick_code

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, with a traceback on stderr


def _duration(text):
    """argparse type: ``500ms``, ``2s``, ``1`` (seconds) → float."""
    try:
        value = units.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _kick_code(text):
    """argparse type: a close code the admin API accepts for a kick."""
    try:
        code = int(text)
    except ValueError:
        code = None
    if not kick_code(code):
        raise argparse.ArgumentTypeError(
            f"expected 1000, 1001, 1008 or a code from 3000 to 4999, got {text!r}")
    return code


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wsgate",
        description="Operate a wsgate WebSocket gateway: check a config, talk to an "
                    "endpoint, publish to a channel, list or kick connections.")
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check", help="validate a config file as start-up does, without listening",
        description="Validate FILE exactly as `twistd wsgate --config FILE` does at "
                    "start-up, without listening. Prints the effective listeners and the "
                    "routes in matching order and exits 0, or prints the one-line start-up "
                    "error and exits 1.")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG, metavar="FILE",
                       help=f"the config file (default: {DEFAULT_CONFIG})")
    check.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing but warnings when the config is valid")
    check.set_defaults(run=_run_check)

    connect = commands.add_parser(
        "connect", help="an interactive WebSocket client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Connect to a WebSocket URL. Each line of standard input is sent as a\n"
                    "text message; messages received are printed on standard output (binary\n"
                    "as hex, or as a byte count over 64 bytes); the connection, the ping time\n"
                    "and the close code and reason are printed on standard error. At the end\n"
                    "of input, wait --wait seconds for replies, then close with 1000. A close\n"
                    "from the server is answered with the server's status code.",
        epilog="exit status: 0 after a 1000 close, 1 when the server refused the "
               "handshake\n(its HTTP status and body are printed), 2 on a connection "
               "error, 3 on any other close.\n\nexamples:\n"
               "  wsgate connect -x hello ws://127.0.0.1:8080/echo\n"
               "  wsgate connect -s chat.v2 -H 'Authorization: Bearer T' "
               "wss://gw.example.com/chat/lobby\n")
    connect.add_argument("url", metavar="URL", help="ws://host[:port]/path or wss://...")
    connect.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="an extra request header (repeatable; Host, User-Agent and "
                              "Origin replace the defaults)")
    connect.add_argument("-s", "--subprotocol", action="append", default=[],
                         metavar="SUBPROTOCOL", help="offer this subprotocol (repeatable)")
    connect.add_argument("--origin", help="send this Origin header")
    connect.add_argument("--ca", metavar="FILE",
                         help="trust the CA certificates in this PEM file (wss://) instead of "
                              "the system's")
    connect.add_argument("--insecure", action="store_true",
                         help="do not verify the server's certificate (wss://)")
    connect.add_argument("--compress", action="store_true",
                         help="offer permessage-deflate compression")
    connect.add_argument("-x", "--execute", action="append", default=[], metavar="MESSAGE",
                         help="send this message (repeatable), print the replies and close "
                              "after --wait; standard input is not read")
    connect.add_argument("--wait", type=_duration, default=1.0, metavar="SECONDS",
                         help="how long to wait for replies before closing (default: 1; "
                              "500ms, 2s, ... accepted)")
    connect.add_argument("--ping", action="store_true",
                         help="send a ping and print its round-trip time; like -x, standard "
                              "input is not read")
    connect.add_argument("--binary", action="store_true",
                         help="send messages as binary (their UTF-8 bytes) instead of text")
    connect.add_argument("--timeout", type=_duration, default=10.0, metavar="SECONDS",
                         help="time allowed to connect and to finish the handshake "
                              "(default: 10)")
    connect.add_argument("-v", "--verbose", action="store_true",
                         help="print the request and response heads on standard error")
    connect.set_defaults(run=_run_connect)

    publish = commands.add_parser(
        "publish", help="publish a message to a channel through the admin API",
        description="POST /publish/CHANNEL on the admin endpoint with MESSAGE (or "
                    "standard input, for - or no MESSAGE) as the body and print the answer. "
                    "Exit 0 on a 2xx answer, 1 on another answer, 2 when unreachable.")
    publish.add_argument("channel", metavar="CHANNEL", help="e.g. room:lobby")
    publish.add_argument("message", nargs="?", metavar="MESSAGE",
                         help="the message; - or none reads standard input (one trailing "
                              "line ending removed)")
    publish.add_argument("--binary", action="store_true",
                         help="publish a binary message (application/octet-stream)")
    _admin_options(publish)
    publish.set_defaults(run=_run_publish)

    connections = commands.add_parser(
        "connections", help="list the open connections, or kick one, through the admin API",
        description="GET /connections on the admin endpoint and print them as a table, or "
                    "with --kick ID, DELETE /connections/ID. Exit 0 on a 2xx answer, 1 on "
                    "another answer (404: no such connection), 2 when unreachable.")
    connections.add_argument("--kick", metavar="ID", help="close this connection")
    connections.add_argument("--code", type=_kick_code, metavar="CODE",
                             help="with --kick: the close code: 1000, 1001, 1008 or 3000-4999 "
                                  "(default: the gateway's, 1008)")
    connections.add_argument("--reason", metavar="TEXT", help="with --kick: the close reason")
    connections.add_argument("--json", action="store_true",
                             help="print the answer as it came (JSON) instead of a table")
    _admin_options(connections)
    connections.set_defaults(run=_run_connections)
    return parser


def _admin_options(parser):
    parser.add_argument("--config", metavar="FILE",
                        help="read the admin endpoint and token from this config file's "
                             "[admin] section (--admin and --token still win)")
    parser.add_argument("--admin", metavar="URL",
                        help=f"the admin endpoint (default: --config's, else "
                             f"{admin.DEFAULT_ADMIN})")
    parser.add_argument("--token", help=f"the admin token (default: --config's, else "
                                        f"${admin.TOKEN_ENV})")
    parser.add_argument("--timeout", type=_duration, default=10.0, metavar="SECONDS",
                        help="time allowed for the answer (default: 10)")


def main(argv=None):
    """Run the command line *argv* (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(parser, args)
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------ commands


def _run_check(parser, args):
    from wsgate.cli import check

    return check.run(args.file, quiet=args.quiet)


def _run_connect(parser, args):
    from wsgate.cli import connect

    try:
        options = connect.ConnectOptions(
            target=connect.parse_target(args.url),
            headers=tuple(connect.parse_header(text) for text in args.header),
            subprotocols=tuple(args.subprotocol),
            origin=args.origin, ca=args.ca, insecure=args.insecure, compress=args.compress,
            messages=tuple(args.execute), wait=args.wait, ping=args.ping, binary=args.binary,
            timeout=args.timeout, verbose=args.verbose)
    except ValueError as e:
        parser.exit(2, f"wsgate connect: {e}\n")
    return _react(lambda reactor: connect.connect(reactor, options))


def _resolve_admin(parser, args, command):
    """Fill ``args.admin`` and ``args.config_token`` from ``--config`` where not given."""
    args.config_token = None
    if args.config is not None:
        try:
            url, args.config_token = admin.from_config(args.config)
        except ValueError as e:
            parser.exit(2, f"wsgate {command}: {e}\n")
        if args.admin is None:
            args.admin = url
    if args.admin is None:
        args.admin = admin.DEFAULT_ADMIN


def _run_publish(parser, args):
    _resolve_admin(parser, args, "publish")
    try:
        message = admin.message_from(args.message, sys.stdin.buffer, args.binary)
        request = admin.publish_request(args.admin, args.channel, message, args.binary)
    except ValueError as e:
        parser.exit(2, f"wsgate publish: {e}\n")
    return _react(lambda reactor: admin.call(
        reactor, request, _token(args), args.timeout, admin.print_body))


def _run_connections(parser, args):
    _resolve_admin(parser, args, "connections")
    if args.kick is None and (args.code is not None or args.reason is not None):
        parser.exit(2, "wsgate connections: --code and --reason go with --kick ID\n")
    try:
        if args.kick is not None:
            request = admin.kick_request(args.admin, args.kick, args.code, args.reason)
            show = admin.print_body
        else:
            request = admin.list_request(args.admin)
            show = admin.print_body if args.json else admin.print_connections
    except ValueError as e:
        parser.exit(2, f"wsgate connections: {e}\n")
    return _react(lambda reactor: admin.call(reactor, request, _token(args), args.timeout,
                                             show))


def _token(args):
    """``--token``, else the ``--config`` file's, else ``$WSGATE_ADMIN_TOKEN``; an empty one
    means none."""
    if args.token is not None:
        return args.token or None
    if args.config_token is not None:
        return args.config_token
    return os.environ.get(admin.TOKEN_ENV) or None


def _react(start):
    """Run *start(reactor)* → Deferred[int] on the reactor; return the exit status."""
    from twisted.internet import task

    def run(reactor):
        d = start(reactor)
        d.addCallbacks(_exit_with, _internal_error)
        return d

    try:
        task.react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0  # pragma: no cover - react always exits


def _exit_with(code):
    if code:
        raise SystemExit(code)


def _internal_error(failure):
    sys.stderr.write("wsgate: internal error:\n" + failure.getTraceback())
    raise SystemExit(EXIT_INTERNAL)

