"""The signing keys a ``jwt`` policy gets from an OIDC provider's JWKS URL.

:class:`JwksKeys` fetches the key set without blocking the reactor, keeps it,
and fetches it again when a token names a key it does not hold (the provider
rotated its keys), at most once per ``jwks_refresh``: a flood of tokens with
made-up ``kid`` values costs the provider one request per interval. A token
that arrives while a fetch runs waits for it. A provider that cannot be
reached before any key arrived is retried with a backoff (1s, doubling, at
most ``jwks_refresh`` apart); meanwhile tokens are refused (401). A failed
refetch keeps the keys already held. Each outage is logged once
(``wsgate.jwks.failed``, a warning), each key set that arrives once
(``wsgate.jwks.fetched``).

Symmetric (``oct``) keys and encryption keys (``use = enc``) are ignored: a
published symmetric key would let anyone sign.
"""

import json
import weakref

from jwt import PyJWKSet
from jwt.exceptions import PyJWKSetError
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from wsgate import observe

FETCH_TIMEOUT = 5.0  # seconds for one fetch, connection included
MAX_DOCUMENT = 1024 * 1024  # bytes: a JWKS is a few KiB
FIRST_RETRY = 1.0  # seconds before the first retry of a failed start-up fetch


class JwksError(Exception):
    """The JWKS URL could not be fetched, or did not hold usable signing keys."""


def parse_jwks(document):
    """A JWKS document (bytes) → ``{kid: PyJWK}`` of its signing keys (kid may be None).

    Raises :class:`JwksError` when it is not a JWKS or holds no usable key.
    """
    try:
        data = json.loads(document)
    except ValueError:
        raise JwksError("the answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('expected a JSON object with a "keys" list')
    try:
        key_set = PyJWKSet.from_dict(data)
    except PyJWKSetError as e:
        raise JwksError(str(e)) from None
    keys = {key.key_id: key for key in key_set.keys
            if key.key_type != "oct" and key.public_key_use in (None, "sig")}
    if not keys:
        raise JwksError("no usable signing key (RSA, EC or OKP, not use = enc)")
    return keys


class JwksKeys:
    """The key set of one JWKS URL; see the module docstring.

    *fetch(url)* returns a Deferred firing with the document's bytes (see
    :func:`http_fetcher`); *clock* is an ``IReactorTime``; *refresh* the
    minimum number of seconds between two fetches a token may cause.
    Call :meth:`start` once the reactor runs.
    """

    def __init__(self, url, fetch, clock, refresh, policy_name):
        self.url, self.clock, self.refresh = url, clock, refresh
        self.policy_name = policy_name
        self.keys = None  # {kid: PyJWK} once a fetch succeeded
        self._fetch_document = fetch
        self._last = None  # clock time the last fetch started
        self._waiters = None  # a list of Deferreds while a fetch runs, else None
        self._retry = None  # the DelayedCall of the next start-up retry
        self._retry_delay = min(FIRST_RETRY, refresh)
        self._failing = False  # an outage was logged and has not ended

    def start(self):
        """Fetch the keys for the first time (retried until they arrive)."""
        if self._last is None and self._waiters is None:
            self._fetch()

    def key(self, kid):
        """The key a token with header ``kid`` (None: none) is checked with.

        Returns the key, None (no such key, and no fetch may run now), or a
        Deferred firing with either once the fetch the request waits for (its
        own or one already running) is over. A token without ``kid`` is
        checked with the only key of a set of one.
        """
        found = self._find(kid)
        if found is not None:
            return found
        if self._waiters is None and (self.keys is None or kid is not None) \
                and self._may_fetch():
            self._fetch()
        if self._waiters is None:  # no fetch runs (or it was over at once)
            return self._find(kid)
        waiter = defer.Deferred(self._forget)  # cancelled: the client left
        self._waiters.append(waiter)
        return waiter.addCallback(lambda _: self._find(kid))

    def _forget(self, waiter):
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)

    def _find(self, kid):
        if not self.keys:
            return None
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    def _may_fetch(self):
        return self._last is None or self.clock.seconds() - self._last >= self.refresh

    def _fetch(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._last = self.clock.seconds()
        self._waiters = []
        d = defer.maybeDeferred(self._fetch_document, self.url)
        d.addCallback(parse_jwks)
        d.addCallbacks(self._fetched, self._failed)
        d.addBoth(self._wake)

    def _fetched(self, keys):
        self.keys = keys
        self._failing = False
        self._retry_delay = min(FIRST_RETRY, self.refresh)
        observe.emit("wsgate.jwks.fetched",
                     "wsgate: [policy:{policy}] fetched {keys} signing keys from {url}",
                     policy=self.policy_name, url=self.url, keys=len(keys))

    def _failed(self, failure):
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer within {FETCH_TIMEOUT:g}s"
        else:
            why = failure.getErrorMessage() or failure.type.__name__
        if not self._failing:
            self._failing = True
            then = ("its tokens are refused (401) until keys arrive; retrying"
                    if self.keys is None else
                    f"keeping the {len(self.keys)} keys fetched before")
            observe.emit("wsgate.jwks.failed",
                         "wsgate: [policy:{policy}] cannot fetch the signing keys at {url}: "
                         "{error}; {then}", level=LogLevel.warn,
                         policy=self.policy_name, url=self.url, error=why, then=then)
        if self.keys is None:
            delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2,
                                                              max(self.refresh, FIRST_RETRY))
            # a weak reference: a key set no policy uses any more (replaced by a
            # reload) stops retrying
            self._retry = self.clock.callLater(delay, _retry, weakref.ref(self))

    def _wake(self, _):
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)


def _retry(ref):
    keys = ref()
    if keys is not None and keys._waiters is None:
        keys._fetch()


# ------------------------------------------------------------------- HTTP


@implementer(IPolicyForHTTPS)
class VerifyingTLS:
    """https for the JWKS URL: the chain and the host name are verified, against the
    platform's CAs or the PEM file *ca* (``jwks_ca``)."""

    def __init__(self, ca=None):
        self.ca = ca

    def creatorForNetloc(self, hostname, port):
        from wsgate.tls import upstream_tls_options

        return upstream_tls_options(hostname.decode("ascii"), self.ca, True)


class _Body(Protocol):
    """Collects a response body of at most *limit* bytes into *finished*."""

    def __init__(self, finished, limit):
        self.finished, self.limit = finished, limit
        self.parts, self.size = [], 0

    def dataReceived(self, data):
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            if not self.finished.called:
                self.finished.errback(JwksError(f"the answer is over {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _read(response, limit):
    body = _Body(None, limit)
    body.finished = defer.Deferred(lambda d: body.transport and body.transport.stopProducing())
    response.deliverBody(body)

    def check(document):
        if response.code != 200:
            raise JwksError(f"answered {response.code} instead of 200")
        return document
    return body.finished.addCallback(check)


def http_fetcher(reactor, tls=None, timeout=FETCH_TIMEOUT, limit=MAX_DOCUMENT):
    """A *fetch(url)* for :class:`JwksKeys`: GET with twisted.web's Agent (https verified
    by *tls*, a :class:`VerifyingTLS`), at most *limit* bytes, within *timeout*."""
    from twisted.web.client import Agent  # twisted.web's client: only with a jwks_url
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, contextFactory=tls or VerifyingTLS(), connectTimeout=timeout)
    headers = Headers({b"Accept": [b"application/jwk-set+json, application/json"],
                       b"User-Agent": [b"wsgate"]})

    def fetch(url):
        d = agent.request(b"GET", url.encode("ascii"), headers)
        d.addCallback(_read, limit)
        d.addTimeout(timeout, reactor)
        return d
    return fetch
