"""Event-log contract, sources, splits, run-folder steps and the `lum` command line: wires lum, feature_store and ranker."""
