"""``[wsgate] workers = N``: a parent process and N workers sharing the listening sockets.

The parent binds every listener (so a port in use is still one line at start-up),
stops accepting on them itself, and starts N ``python -m wsgate.worker``
processes that inherit the sockets and adopt them (``adoptStreamPort``): the
kernel hands each new connection to one worker. Broadcast channels are shared
through the configured Redis broker, as between machines.

Signals from outside go to the parent only (the unit sets ``KillMode=mixed``):
SIGTERM is forwarded and the parent exits 0 once every worker has drained (a
second SIGTERM is forwarded too, ending them at once); SIGHUP is checked first
(an invalid file is logged and nothing is forwarded) and then forwarded, so
every worker reloads. A worker that dies is started again after a second.
The parent's admin endpoint answers for all workers (see wsgate.pool_admin).
"""

import os
import signal
import sys
import tempfile

from twisted.application import service
from twisted.internet import protocol, reactor
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from wsgate import observe
from wsgate.config import ConfigError, load
from wsgate.service import BindError, bind
from wsgate.tap import fail

_log = Logger()
RESTART_DELAY = 1.0


class _Worker(protocol.ProcessProtocol):
    """One worker process; tells the pool when it ends."""

    def __init__(self, pool, index):
        self.pool, self.index = pool, index
        self.ended = False

    def processEnded(self, reason):
        self.ended = True
        self.pool.worker_ended(self, getattr(reason.value, "exitCode", None),
                               getattr(reason.value, "signal", None))


class WorkerPool(service.MultiService):
    """The parent process's service: the sockets, the workers, the pooled admin endpoint."""

    def __init__(self, config):
        super().__init__()
        from wsgate.service import _raise_open_file_limit

        _raise_open_file_limit()
        self.config = config
        self.count = config.core.workers
        self.sockets = {}  # listener name → (fd, family, port)
        self.workers = {}  # index → _Worker
        self.control_dir = tempfile.mkdtemp(prefix="wsgate-workers-")
        self.stopping = 0
        self._kill_call = None

    def setServiceParent(self, parent):
        from wsgate.service import install_log_format

        install_log_format(parent, self.config)
        return super().setServiceParent(parent)

    def control_path(self, index):
        return os.path.join(self.control_dir, f"worker-{index}.sock")

    # -- start-up

    def privilegedStartService(self):
        super().privilegedStartService()
        for listener in self.config.listeners:
            try:
                port = bind(listener.endpoint, Factory(), f"[listen:{listener.name}]",
                            listener.backlog)
            except BindError as e:
                fail(str(e))
            port.stopReading()  # the workers accept; the parent only keeps the socket
            family = getattr(port, "addressFamily", None) or port.socket.family
            self.sockets[listener.name] = (port.fileno(), int(family), port)
            address = port.getHost()
            observe.emit(
                "wsgate.listening", "listening on {address} ([listen:{listener}], "
                "{workers} workers)", listener=listener.name, workers=self.count,
                address=observe.format_address(address), host=getattr(address, "host", None),
                port=getattr(address, "port", None), tls=listener.is_tls)
        if self.config.admin is not None:
            from wsgate.admin import bound_requests
            from wsgate.pool_admin import PoolAdminSite

            try:
                self.admin_port = bind(self.config.admin.endpoint,
                                       bound_requests(PoolAdminSite(self)), "[admin]")
            except BindError as e:
                fail(str(e))
            address = self.admin_port.getHost()
            observe.emit("wsgate.listening", "admin listening on {address}", listener="admin",
                         address=observe.format_address(address),
                         host=getattr(address, "host", None),
                         port=getattr(address, "port", None), tls=False)

    def startService(self):
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        reactor.callWhenRunning(self._install_signal_handlers)

    def spawn(self, index):
        args = [sys.executable, "-m", "wsgate.worker", "--config", self.config.path,
                "--index", str(index), "--control", self.control_path(index)]
        child_fds = {0: "w", 1: 1, 2: 2}
        for name, (fd, family, _) in self.sockets.items():
            args += ["--listen", f"{name}={fd}:{family}"]
            child_fds[fd] = fd
        worker = _Worker(self, index)
        reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(),
                             childFDs=child_fds)
        self.workers[index] = worker

    def _install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        observe.emit("wsgate.ready", "wsgate ready (node {node}, {workers} workers)",
                     node=self.config.core.node_id, workers=self.count)

    def _on_signal(self, signum, frame):
        action = self.reload if signum == signal.SIGHUP else self.stop
        reactor.callFromThread(action)

    # -- workers

    def alive(self):
        return [w for w in self.workers.values() if not w.ended]

    def _send(self, signum):
        for worker in self.alive():
            try:
                worker.transport.signalProcess(signum)
            except Exception:  # already gone
                pass

    def worker_ended(self, worker, code, signum):
        if self.stopping:
            if not self.alive():
                self._finish()
            return
        _log.warn("wsgate: worker {index} ended (exit {code}, signal {signal}); starting it "
                  "again", index=worker.index, code=code, signal=signum)
        reactor.callLater(RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index):
        if not self.stopping:
            self.spawn(index)

    # -- signals

    def stop(self):
        """SIGTERM: every worker drains; the parent exits when they have."""
        self.stopping += 1
        _log.info("wsgate: stopping {n} workers", n=len(self.alive()))
        self._send(signal.SIGTERM)
        if self.stopping == 1:
            self._kill_call = reactor.callLater(self.config.core.drain_timeout + 10,
                                                self._kill)
        if not self.alive():
            self._finish()

    def _kill(self):
        self._kill_call = None
        self._send(signal.SIGKILL)

    def _finish(self):
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        if reactor.running:
            reactor.stop()

    def reload(self):
        """SIGHUP: check the file here, then let every worker reload it."""
        try:
            config = load(self.config.path)
            if config.core.workers != self.config.core.workers or \
                    [(l.name, l.endpoint) for l in config.listeners] != \
                    [(l.name, l.endpoint) for l in self.config.listeners]:
                raise ConfigError(config.path, "wsgate", "workers",
                                  "changing workers or listener endpoints needs a restart")
        except ConfigError as e:
            _log.error("wsgate: config reload failed, workers keep their config: {error}",
                       error=str(e))
            return
        self.config = config
        self._send(signal.SIGHUP)
        _log.info("wsgate: reload forwarded to {n} workers", n=len(self.alive()))

    def stopService(self):
        for _, _, port in self.sockets.values():
            port.stopListening()
        return super().stopService()
