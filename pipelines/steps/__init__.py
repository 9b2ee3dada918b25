"""The run's steps, one module per wing (data, lm, embed, features, rankers); the CLI and the run both call them."""

# What a step returns when its output was already there and it did nothing: the run then keeps the duration of the
# run that made the output instead of recording the check's fraction of a second.
UP_TO_DATE = "up to date"
