"""keyrelay command line: the local stack, the components, and the admin API from the shell."""

__all__ = ["__version__"]

# The package's version (pyproject.toml reads it from here).
__version__ = "0.1.0"
