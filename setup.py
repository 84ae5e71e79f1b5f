"""Package list for setuptools (everything else is in pyproject.toml).

pyproject.toml alone cannot combine automatic discovery with folders installed under another name, so this file
finds every `fnscale*` package (new ones included without an edit) and adds `kernels/` and `launch_configs/`,
which pyproject.toml's package-dir installs as fnscale.kernels and fnscale.launch_configs.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fnscale", "fnscale.*"]), "fnscale.kernels", "fnscale.launch_configs"])
