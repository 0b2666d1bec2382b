"""From YAML files to a checked spec and its desired graph, with file:line diagnostics."""
