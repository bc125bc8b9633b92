"""The ``safegate`` command: one entry point over the four packages (see ARCHITECTURE.md)."""
