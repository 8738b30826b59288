"""The ``transnext`` command-line tool."""
