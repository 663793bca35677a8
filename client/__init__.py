"""The command-line client (`ics`): it talks to the service over HTTP only.

`__version__` is the project's one version (pyproject.toml reads it from here): every
program's `--version` prints it, and the client, installed alone, has it too.
"""

__version__ = "1.1.0"
