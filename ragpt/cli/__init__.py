"""The `ragpt` command line: one module per command group."""
