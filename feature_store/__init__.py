"""The Feast feature store for LUM features: the repo template, point-in-time offline tables, ingestion of
`lum embed` output, training sets, materialization and online lookups (Python SDK, Redis, HTTP)."""
