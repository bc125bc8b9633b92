"""What all four packages share: the ``safegate`` command and database plumbing.

See ARCHITECTURE.md: ``safegate.cli`` mounts each package's commands (nothing imports
it), and ``safegate.database`` gives every package the same engine, session and
migration handling for its own tables.
"""
