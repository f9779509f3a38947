"""The package version, in a module of its own so that no module imports the package root.

pyproject.toml reads it from here (setuptools dynamic version): this is the one place it is written.
"""

__version__ = "0.2.0"
