"""cnnrun's Hydra launcher for Ray (``hydra/launcher=ray`` and ``ray_local``, conf/hydra/launcher/).

Hydra finds launchers only in the ``hydra_plugins`` namespace package, so this one lives here, beside cnnrun.
"""
