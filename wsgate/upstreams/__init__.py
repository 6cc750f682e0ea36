"""Upstream pools: several servers behind one proxy route.

* :mod:`~wsgate.upstreams.config`: ``[upstream:NAME]`` and server URLs, parsed into
  frozen data (also what a single ``upstream = URL`` is parsed with);
* :mod:`~wsgate.upstreams.balance`: the balancing methods as pure functions
  (least_conn, smooth weighted round robin, weighted rendezvous hashing);
* :mod:`~wsgate.upstreams.pools`: the live state of each server (its live
  connections, passive and active health, slow start) kept across reloads;
* :mod:`~wsgate.upstreams.health`: active health checks;
* :mod:`~wsgate.upstreams.moving`: draining a server, rebalancing a pool;
* :mod:`~wsgate.upstreams.dns`: the addresses of servers given by name (``resolve``).

The handshake's tries and failover are in :mod:`wsgate.targets.proxy`.
"""
