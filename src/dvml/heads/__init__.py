"""See the package docstring of dvml."""
