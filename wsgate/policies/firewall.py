"""``type = firewall``: allow and deny lists of networks for the client address.

Evaluated on the client address after ``trusted_proxies``. Deny wins; with
``allow`` set, every address outside it is denied. IPv4 and IPv6.
"""

import ipaddress

from zope.interface import implementer

from wsgate import units
from wsgate.forwarding import parse_networks
from wsgate.interfaces import IPolicy
from wsgate.policies import Deny, PolicyConfigError
from wsgate.policies.base import PolicyType


@implementer(IPolicy)
class FirewallPolicy:
    mode = "enforce"

    def __init__(self, name, allow, deny):
        self.name, self.allow, self.deny = name, allow, deny

    def check(self, request):
        try:
            address = ipaddress.ip_address(request.client)
        except ValueError:
            return Deny(403, "Forbidden")
        if any(address in net for net in self.deny):
            return Deny(403, "Forbidden")
        if self.allow and not any(address in net for net in self.allow):
            return Deny(403, "Forbidden")
        return None


def build(name, settings, context):
    def networks(text):
        return parse_networks(units.parse_list(text))
    allow = settings.get("allow", networks, ())
    deny = settings.get("deny", networks, ())
    if not allow and not deny:
        raise PolicyConfigError("allow", "expected allow or deny networks")
    return FirewallPolicy(name, allow, deny)


firewall = PolicyType("firewall", ("allow", "deny"), build)
