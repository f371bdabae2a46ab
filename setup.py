"""Package discovery; everything else is in pyproject.toml.

``conf/`` lives at the top of the repository but ships as ``cnnrun.conf`` (pyproject's package-dir), where Hydra
reads it from. Automatic discovery cannot see a package whose folder is outside its parent's, so its packages are
listed here; namespace discovery also takes the folders of data files (conf groups, keras_home). ``hydra_plugins``
(the Ray launcher) is a namespace package that other Hydra plugins share: it has no ``__init__.py``.
"""

from setuptools import find_namespace_packages, setup

PACKAGE_FOLDERS = find_namespace_packages(include=["cnnrun", "cnnrun.*"], exclude=["*__pycache__"])
PLUGIN_FOLDERS = find_namespace_packages(include=["hydra_plugins", "hydra_plugins.*"], exclude=["*__pycache__"])
CONF_FOLDERS = ["cnnrun.conf"] + [f"cnnrun.conf.{name}" for name in find_namespace_packages("conf")]

setup(packages=PACKAGE_FOLDERS + PLUGIN_FOLDERS + CONF_FOLDERS)
