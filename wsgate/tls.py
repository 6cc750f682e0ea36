"""TLS for listeners: pyOpenSSL contexts, SNI certificate choice, protocol floor.

A listener with ``tls_cert`` gets a :class:`ServerTLS`: one context for the
default certificate plus one per ``<hostname>.pem`` in ``tls_sni_dir``; the
SNI callback switches the connection to the matching context. Files are read
once, when the config is loaded. It is handed to Twisted as an
``IOpenSSLServerConnectionCreator`` (the interface ``TLSMemoryBIOFactory``
expects; an object with only ``getContext`` gets a
``LegacyContextFactoryWarning``).
"""

import os

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

_CIPHERS = (
    b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS:!SHA1"
)
_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


class TLSConfigError(Exception):
    """A certificate or key that cannot be used; *key* is the config key to blame."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key, self.message = key, message


def _read(key, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(key, f"cannot read {path}: {e.strerror}") from None


def _context(cert_key, cert_path, key_key, key_path, min_version):
    """A server context for one certificate chain and private key (PEM files)."""
    for key, path in ((cert_key, cert_path), (key_key, key_path)):
        if b"-----BEGIN" not in _read(key, path):
            raise TLSConfigError(key, f"expected PEM data in {path}")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_MIN_VERSIONS[min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(_CIPHERS)
    try:
        ctx.use_certificate_chain_file(cert_path.encode())
    except SSL.Error:
        raise TLSConfigError(
            cert_key, f"expected a PEM certificate (chain) in {cert_path}") from None
    try:
        ctx.use_privatekey_file(key_path.encode())
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(
            key_key, f"the private key in {key_path} is not a PEM key matching the "
            f"certificate in {cert_path}") from None
    ctx.set_alpn_select_callback(_choose_http11)
    return ctx


def _choose_http11(conn, offered):
    """WebSockets here speak HTTP/1.1: pick it when offered, else no ALPN."""
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS side of one listener: makes each accepted connection's ``SSL.Connection``."""

    def __init__(self, default_context, sni_contexts):
        self._default = default_context
        self._by_name = dict(sni_contexts)
        if self._by_name:
            self._default.set_tlsext_servername_callback(self._choose_by_sni)

    @classmethod
    def load(cls, cert, key, sni_dir, min_version="1.2"):
        """Read the files; raise :class:`TLSConfigError` naming the key at fault."""
        default = _context("tls_cert", cert, "tls_key", key or cert, min_version)
        sni = {}
        if sni_dir is not None:
            try:
                names = sorted(os.listdir(sni_dir))
            except OSError as e:
                raise TLSConfigError(
                    "tls_sni_dir", f"cannot read {sni_dir}: {e.strerror}") from None
            for filename in names:
                if not filename.endswith(".pem"):
                    continue
                path = os.path.join(sni_dir, filename)
                hostname = filename[: -len(".pem")].lower()
                sni[hostname.encode("idna")] = _context(
                    "tls_sni_dir", path, "tls_sni_dir", path, min_version)
        return cls(default, sni)

    def _choose_by_sni(self, connection):
        name = connection.get_servername()
        if name:
            ctx = self._by_name.get(name.lower())
            if ctx is not None:
                connection.set_context(ctx)

    def serverConnectionForTLS(self, tlsProtocol):
        """A server connection on the default context (SNI may switch it)."""
        return SSL.Connection(self._default, None)


def upstream_tls_options(hostname, ca_path, verify):
    """Client TLS for a wss:// upstream: verifies the chain and the host name.

    *ca_path* (PEM, may hold several certificates) replaces the platform's
    trust store; ``verify = False`` turns all checks off (warned at start-up).
    """
    from twisted.internet import ssl

    if not verify:
        return ssl.CertificateOptions(verify=False)
    if ca_path is None:
        trust = ssl.platformTrust()
    else:
        pem = _read("upstream_ca", ca_path)
        try:
            certificates = [
                ssl.Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
                for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        except Exception:
            certificates = []
        if not certificates:
            raise TLSConfigError("upstream_ca", f"expected PEM certificates in {ca_path}")
        trust = ssl.trustRootFromCertificates(certificates)
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)
