"""TorchRec DLRM and LightGBM rankers (issue #6): not built yet."""
