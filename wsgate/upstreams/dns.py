"""Looking up the addresses of a pool server given by host name (``resolve``).

Every address is a server: Kubernetes headless services and DNS round
robin publish one record per instance. A name is looked up first in the
hosts file (``[wsgate] dns_hosts``, ``/etc/hosts`` by default: every line
naming it counts, IPv4 and IPv6), and only when the file does not name it,
in DNS with Twisted's resolver (A and AAAA, never blocking the reactor;
the servers of ``[wsgate] dns_servers``, else ``/etc/resolv.conf``'s), each
query given up after 1 s and once more after 3 s. The hosts file is read at
each lookup, as Twisted's own hosts resolver does (a small local file).

A lookup that fails (no answer, a timeout, NXDOMAIN) fails: the pool keeps
the addresses it had, so a DNS outage never empties a pool.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet import defer
from twisted.names import client
from twisted.names import dns as names
from twisted.names.hosts import searchFileForAll
from twisted.python.filepath import FilePath

DNS_TIMEOUT = (1, 3)  # seconds: the first try, then one more


class LookupFailed(Exception):
    """No usable answer for a name."""


class Addresses:
    """Looks up every address of a name (see the module docstring)."""

    def __init__(self, reactor: Any, hosts_file: str = "/etc/hosts",
                 servers: tuple[tuple[str, int], ...] | None = None):
        self.reactor = reactor
        self.hosts_file = hosts_file
        self.servers = servers
        self._dns: Any = None

    def _resolver(self) -> Any:
        if self._dns is None:
            if self.servers:
                self._dns = client.Resolver(servers=list(self.servers), timeout=DNS_TIMEOUT,
                                            reactor=self.reactor)
            else:
                self._dns = client.Resolver(resolv="/etc/resolv.conf", timeout=DNS_TIMEOUT,
                                            reactor=self.reactor)
        return self._dns

    def lookup(self, name: str) -> defer.Deferred[tuple[str, ...]]:
        """Every address of *name*, sorted (a Deferred); LookupFailed when none came."""
        found = searchFileForAll(FilePath(self.hosts_file), name.encode("idna"))
        if found:
            return defer.succeed(tuple(sorted(set(found))))
        resolver = self._resolver()
        queries = [resolver.lookupAddress(name), resolver.lookupIPV6Address(name)]
        return defer.DeferredList(queries, consumeErrors=True).addCallback(_addresses, name)


def _addresses(results: list[tuple[bool, Any]], name: str) -> tuple[str, ...]:
    addresses = set()
    answered = False
    errors = []
    for success, value in results:
        if not success:
            errors.append(value.getErrorMessage() or value.type.__name__)
            continue
        answered = True
        for record in value[0]:
            if record.type == names.A:
                addresses.add(socket.inet_ntop(socket.AF_INET, record.payload.address))
            elif record.type == names.AAAA:
                addresses.add(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    if not answered or not addresses:
        raise LookupFailed(f"no address for {name}: {'; '.join(errors) or 'no records'}")
    return tuple(sorted(addresses))


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """``[wsgate] dns_servers``: ``127.0.0.1:5353, 10.0.0.2`` → ((host, port), ...)."""
    result = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise ValueError("an empty entry between commas")
        host, port_text = entry, "53"
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest.startswith(":"):
                port_text = rest[1:]
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
        port = int(port_text) if port_text.isdigit() else -1
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected ADDRESS[:PORT] entries, got {entry!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {entry!r}")
        result.append((host, port))
    return tuple(result)
