"""`python -m pipelines.cli ...`: the `lum` command (used for subprocess steps and torchrun)."""

from pipelines.cli import main

main()
