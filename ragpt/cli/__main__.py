"""`python -m ragpt.cli ...` (and `torchrun ... -m ragpt.cli train ...`) runs the `ragpt` command."""

from ragpt.cli.main import app

app()
