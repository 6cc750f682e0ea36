"""The ``wsgate.plugins`` namespace: policy, router and target factories found by
twisted.plugin.

Third-party distributions ship a module ``wsgate/plugins/<name>.py`` (and no
``__init__.py`` files) providing objects that provide ``IPlugin`` and
``IPolicyFactory``, ``IRouterFactory`` or ``ITargetFactory``; ``getPlugins``
finds them after ``pip install`` (entry points too: see :mod:`wsgate.discovery`).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__ = []
