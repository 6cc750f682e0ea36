"""twistd plugin: ``twistd wsgate --config FILE``.

Kept tiny on purpose: twistd imports every plugin to list them, so this
module must not import the reactor or the rest of wsgate.
"""
from twisted.application.service import ServiceMaker

wsgate = ServiceMaker(
    "wsgate",
    "wsgate.tap",
    "WebSocket gateway: TLS, routing, policies, proxy and broadcast",
    "wsgate",
)
