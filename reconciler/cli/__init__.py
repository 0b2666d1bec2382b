"""Command line: commands and renderers. The top layer; nothing imports it."""
