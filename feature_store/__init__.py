"""The Feast feature store for LUM features (issue #5): not built yet; the embedding job writes its input."""
