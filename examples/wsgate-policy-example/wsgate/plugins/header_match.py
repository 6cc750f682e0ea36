"""The plugin module twisted.plugin finds: it offers what wsgate_policy_example defines (the same
object the ``wsgate.policies`` entry point names, so the two ways find one plugin)."""

from wsgate_policy_example import header_match

__all__ = ["header_match"]
