"""``[wsgate] workers = N``: a parent process and N workers sharing the listening sockets.

The parent binds every listener (so a port in use is still one line at start-up),
stops accepting on them itself, and starts N ``python -m wsgate.worker``
processes (:mod:`wsgate.worker`) that inherit the sockets and adopt them
(``AdoptedStreamServerEndpoint``): the kernel hands each new connection to one
worker. Broadcast channels are shared through the configured Redis broker, as
between machines.

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
import re
import shutil
import tempfile

from twisted.application import service
from twisted.internet import protocol, reactor
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from wsgate import observe, startup
from wsgate.admin import bound_requests
from wsgate.config import ConfigError, load
from wsgate.pool_admin import PoolAdminSite
from wsgate.startup import ListeningService

_log = Logger()
RESTART_DELAY = 1.0  # seconds before a worker that ended is started again


class _Worker(protocol.ProcessProtocol):
    """One worker process; tells the pool when it ends."""

    def __init__(self, pool, index):
        self.pool, self.index = pool, index
        self.ended = False
        self.started = reactor.seconds()  # pool_admin's /livez gives a new worker time

    def processEnded(self, reason):
        self.ended = True
        self.pool.worker_ended(self, getattr(reason.value, "exitCode", None),
                               getattr(reason.value, "signal", None))


# The workers' control sockets live in a private folder named after the parent's
# pid; one left by a parent that was killed (SIGKILL leaves no time to clean up) is
# removed by the next parent that starts.
CONTROL_DIR_PREFIX = "wsgate-workers-"
_CONTROL_DIR = re.compile(re.escape(CONTROL_DIR_PREFIX) + r"(\d+)-")


# A UNIX socket path is at most 107 bytes: a worker whose control socket path is
# longer cannot bind it and would be restarted for ever.
_MAX_SOCKET_PATH = 107


def control_parent():
    """Where the control folder goes: the temp folder ($TMPDIR), or /tmp when the
    sockets' paths under it would be too long for UNIX sockets."""
    parent = tempfile.gettempdir()
    longest = os.path.join(parent, f"{CONTROL_DIR_PREFIX}{os.getpid()}-xxxxxxxx",
                           "worker-9999.sock")
    return parent if len(longest.encode()) <= _MAX_SOCKET_PATH else "/tmp"


def remove_stale_control_dirs(parent=None):
    """Remove the control folders (in *parent*, default the temp folder) of this user's
    pool parents that no longer run."""
    parent = parent or tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = _CONTROL_DIR.match(name)
        path = os.path.join(parent, name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(match.group(1)), 0)  # raises if that parent is gone
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


class WorkerPool(service.MultiService):
    """The parent process's service: the sockets, the workers, the pooled admin endpoint.

    Its children bind every ``[listen:NAME]`` (and ``[admin]``) in
    ``privilegedStartService``, as a single process would; the listening
    sockets are then kept open but not read (:attr:`sockets`), and
    ``startService`` starts the workers, which inherit them.
    """

    def __init__(self, config):
        super().__init__()
        startup.raise_open_file_limit()
        self.config = config
        self.count = config.core.workers
        self.sockets = {}  # listener name → (fd, address family), once bound
        self.workers = {}  # index → _Worker
        parent = control_parent()
        remove_stale_control_dirs(parent)
        self.control_dir = tempfile.mkdtemp(prefix=f"{CONTROL_DIR_PREFIX}{os.getpid()}-",
                                            dir=parent)
        self.stopping = 0
        self._kill_call = None
        self._close_call = None  # the end of drain_delay: the parent's sockets close
        self.listener_services = []  # the ListeningService of each [listen:NAME]
        for listener in config.listeners:  # Factory(): the parent never accepts
            child = ListeningService(
                startup.server_endpoint(reactor, listener.endpoint, listener.backlog),
                Factory(), f"{listener.endpoint} ([listen:{listener.name}])",
                self._keep_socket(listener))
            child.setServiceParent(self)
            self.listener_services.append(child)
        if config.admin is not None:
            ListeningService(startup.server_endpoint(reactor, config.admin.endpoint),
                             bound_requests(PoolAdminSite(self)),
                             f"{config.admin.endpoint} ([admin])",
                             self._admin_bound).setServiceParent(self)

    def setServiceParent(self, parent):
        startup.install_log_format(parent, self.config)
        return super().setServiceParent(parent)

    def control_path(self, index):
        """The UNIX socket on which worker *index* answers the admin API (unauthenticated:
        in a directory only this user can enter)."""
        return os.path.join(self.control_dir, f"worker-{index}.sock")

    # -- start-up

    def _keep_socket(self, listener):
        def bound(port):
            port.stopReading()  # the workers accept; the parent only keeps the socket
            family = getattr(port, "addressFamily", None) or port.socket.family
            self.sockets[listener.name] = (port.fileno(), int(family))
            startup.announce_listening(
                port, "listening on {address} ([listen:{listener}], {workers} workers)",
                listener=listener.name, tls=listener.is_tls, workers=self.count)
        return bound

    @staticmethod
    def _admin_bound(port):
        startup.announce_listening(port, "admin listening on {address}", listener="admin",
                                   tls=False)

    def startService(self):
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        reactor.callWhenRunning(self._ready)

    def _ready(self):
        """The reactor runs: SIGTERM/SIGINT stop, SIGHUP reloads; say ``wsgate.ready``."""
        startup.handle_signals(reactor, stop=self.stop, reload=self.reload)
        observe.emit("wsgate.ready", "wsgate ready (node {node}, {workers} workers)",
                     node=self.config.core.node_id, workers=self.count)

    def spawn(self, index):
        args = [sys.executable, "-m", "wsgate.worker", "--config", self.config.path,
                "--index", str(index), "--control", self.control_path(index)]
        child_fds = {0: "w", 1: 1, 2: 2}
        for name, (fd, family) in self.sockets.items():
            args += ["--listen", f"{name}={fd}:{family}"]
            child_fds[fd] = fd
        worker = _Worker(self, index)
        reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(),
                             childFDs=child_fds)
        self.workers[index] = worker

    # -- workers

    def alive(self):
        """The workers whose process has not ended (restarts replace their entry)."""
        return [w for w in self.workers.values() if not w.ended]

    def _send(self, signum):
        for worker in self.alive():
            try:
                worker.transport.signalProcess(signum)
            except Exception:  # already gone
                pass

    def worker_ended(self, worker, code, signum):
        """A worker's process ended: start it again after :data:`RESTART_DELAY`, or, while
        stopping, exit once none is left."""
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
        """SIGTERM: every worker drains; the parent exits when they have.

        Each worker keeps its listeners open for ``drain_delay`` (answering 503),
        then closes them; the parent closes its own copy of each listening socket
        at the same time, so that new connections are refused from then on
        instead of waiting in a socket nobody accepts on.
        """
        self.stopping += 1
        _log.info("wsgate: stopping {n} workers", n=len(self.alive()))
        self._send(signal.SIGTERM)
        if self.stopping == 1:
            core = self.config.core
            self._close_call = reactor.callLater(core.drain_delay, self._close_listeners)
            self._kill_call = reactor.callLater(core.drain_delay + core.drain_timeout + 10,
                                                self._kill)
        if not self.alive():
            self._finish()

    def _close_listeners(self):
        self._close_call = None
        for child in self.listener_services:
            child.stopListening()

    def _kill(self):
        self._kill_call = None
        self._send(signal.SIGKILL)

    def _finish(self):
        shutil.rmtree(self.control_dir, ignore_errors=True)  # every worker has ended
        startup.stop(reactor, self._kill_call, self._close_call)

    def stopService(self):
        shutil.rmtree(self.control_dir, ignore_errors=True)
        return super().stopService()

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
