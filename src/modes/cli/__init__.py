"""The `modes` command line."""
