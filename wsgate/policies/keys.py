"""What a per-client limit counts by: ``ip``, ``identity``, ``header:NAME`` or ``route``."""


def parse_key(text):
    text = text.strip()
    lower = text.lower()
    if lower in ("ip", "identity", "route"):
        return (lower, None)
    if lower.startswith("header:") and len(text) > 7:
        return ("header", text[7:].strip().lower())
    raise ValueError(f"expected ip, identity, header:NAME or route, got {text!r}")


def key_of(spec, request):
    """The limit key of *request*; falls back to the client address when missing."""
    kind, name = spec
    if kind == "ip":
        return "ip:" + request.client
    if kind == "identity":
        return ("id:" + request.identity) if request.identity else "ip:" + request.client
    if kind == "route":
        return "route:" + request.route
    value = request.header(name)
    return ("h:" + value) if value else "ip:" + request.client
