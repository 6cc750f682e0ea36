"""The ``wsgate.plugins`` namespace: policy and router factories found by twisted.plugin.

Third-party distributions ship a module ``wsgate/plugins/<name>.py`` (and no
``__init__.py`` files) providing objects that provide ``IPlugin`` and
``IPolicyFactory`` (or ``IRouterFactory``); ``getPlugins`` finds them after
``pip install``.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__ = []
