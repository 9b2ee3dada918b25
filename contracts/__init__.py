"""The small shared layer beneath `lum`, `feature_store` and `ranker`: only what two wings exchange.

The three wings never import each other (tests/test_layering.py checks it); they meet through files and tables.
What both sides of such an exchange must agree on is defined here, once:

    files.py        atomic writes (temporary file beside the target, then rename) of bytes, text, JSON, Parquet
    names.py        condition slugs, ranker variants, counter and training-set column names
    embeddings.py   the embedding folder `lum embed` writes and the feature store ingests: file names, columns,
                    the manifest (a dataclass and a validating reader)
    candidates.py   the candidates folder `lum retrieve` writes (the same layout, one row per retrieved item)
    settings.py     how every component declares its config dataclass

What does not belong here: anything only one wing uses (it stays in that wing), behaviour (training, joins,
scoring), and heavy dependencies. A module here imports the standard library, numpy, pyarrow (settings.py:
pydantic) and other modules of this package only, never `lum`, `feature_store`, `ranker` or `pipelines`, and
this `__init__` imports nothing, so importing one contract stays cheap (Feast's definitions.py imports names.py).
"""
