"""Fast unit tests (no e2e marker): tiny hand-built inputs, milliseconds each; `make test-fast` runs them."""
