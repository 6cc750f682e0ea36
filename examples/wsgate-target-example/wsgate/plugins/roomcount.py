"""The plugin module twisted.plugin finds: it offers what wsgate_target_example defines (the same
object the ``wsgate.targets`` entry point names, so the two ways find one plugin)."""

from wsgate_target_example import roomcount

__all__ = ["roomcount"]
