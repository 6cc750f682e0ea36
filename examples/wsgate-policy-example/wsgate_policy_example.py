"""``type = header_match``: an example third-party wsgate policy.

Allows a request only when ``header`` has one of ``values``; the value
becomes the identity. Everything it uses is wsgate's public plugin API:
``IPolicy``/``IPolicyFactory`` from ``wsgate.interfaces``, the decisions from
``wsgate.policies`` and ``IPlugin`` from ``twisted.plugin``.

[policy:teams]
type = header_match
header = X-Team
values = blue, green
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from wsgate.interfaces import IPolicy, IPolicyFactory
from wsgate.policies import Allow, Deny, PolicyConfigError


@implementer(IPolicy)
class HeaderMatchPolicy:
    mode = "enforce"  # the gateway sets it from the section's mode key

    def __init__(self, name, header, values):
        self.name, self.header, self.values = name, header, values

    def check(self, request):
        value = request.header(self.header)
        if value is None or value.strip() not in self.values:
            return Deny(403, f"{self.header} not allowed")
        return Allow(identity=value.strip())


@implementer(IPlugin, IPolicyFactory)
class HeaderMatchFactory:
    name = "header_match"
    keys = ("header", "values")

    def __call__(self, name, settings, context):
        if "header" not in settings:
            raise PolicyConfigError("header", "is required")
        values = {v.strip() for v in settings.get("values", "").split(",") if v.strip()}
        if not values:
            raise PolicyConfigError("values", "expected at least one value")
        return HeaderMatchPolicy(name, settings["header"], values)


header_match = HeaderMatchFactory()
