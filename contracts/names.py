"""Names the wings exchange: condition slugs, ranker variants, counter and training-set column names.

The feature store writes a training set (`feature_store/training_set.py`, and the same row online in
`feature_store/online.py`); the ranker reads it (`ranker/schema.py`). Both take the column names from here, so a
renamed column is renamed for both. These names are part of saved artifacts (Parquet columns, Feast feature
names, saved rankers' schemas): changing one breaks every artifact written before.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = [
    "CATEGORY_COLUMN",
    "COUNTER_COLUMNS",
    "FLAG_COLUMNS",
    "HISTORY_CATEGORIES",
    "HISTORY_ITEMS",
    "HISTORY_TIMES",
    "HISTORY_VARIANTS",
    "ID_NORMAL_FORM",
    "ITEM_COUNTERS",
    "MAX_ID_BYTES",
    "LABEL_BITS_COLUMN",
    "LUM_ITEM_COLUMN",
    "LUM_USER_PREFIX",
    "LUM_VARIANTS",
    "MISSING_LUM_COLUMN",
    "REQUEST_CONDITION",
    "SEQUENCE_COLUMNS",
    "ATTENTION_VARIANTS",
    "TRAINING_SET_METADATA_KEY",
    "USER_ROW_COUNTERS",
    "USER_STATS_COLUMNS",
    "VARIANTS",
    "lum_user_column",
    "normalize_id",
    "slug",
]

# ---------------------------------------------------------------------------------------------------------------
# User and item ids

# The Unicode normal form of every user and item id (`lum data import` stores ids so). A composed and a decomposed
# `é` are one user: an id typed on a Mac (NFD file names) must find the same user as one from a web form (NFC).
ID_NORMAL_FORM = "NFC"


# The longest id accepted, in UTF-8 bytes. Real ids are far shorter (UUID 36, SHA-256 hex 64, a product URL a few
# hundred); S3 caps object keys at the same 1,024 bytes. A longer one is nearly always a parse that swallowed text
# (an unclosed quote reading on over many lines): it would become a token, a Feast entity key and a Redis key.
MAX_ID_BYTES = 1024  # the import refuses longer ids; the stream and /rank hold requests to the same limit


def normalize_id(value: str) -> str:
    """The stored form of a user or item id: Unicode NFC. Call it on every id that is looked up (a request's
    user and candidate items): the imported data holds only NFC ids, so an un-normalised id would not be found.

    The import applies the same form to whole Arrow columns (`pyarrow.compute.utf8_normalize(ids, ID_NORMAL_FORM)`,
    in `pipelines/data/contract.py`); both give the same strings (tests/test_hostile_inputs.py checks it)."""
    return unicodedata.normalize(ID_NORMAL_FORM, value)


# ---------------------------------------------------------------------------------------------------------------
# Query conditions

# The query condition answered under each row's own request context (lum/embed.py asks it, ranker/features.py
# matches it to every row).
REQUEST_CONDITION = "request"

_NOT_ASCII_ALNUM = re.compile(r"[^0-9A-Za-z]")


def slug(condition: str) -> str:
    """The column-name form of a condition: ASCII letters and digits, everything else `_`.

        surface=home|device=mobile  ->  surface_home_device_mobile
        surface=café                ->  surface_caf__<8 hex digits>

    A condition with a non-ASCII character also gets 8 hex digits of the SHA-256 of its UTF-8 bytes: replacing
    `é` and `è` both by `_` would give two conditions one column, and Feast, Parquet and LightGBM want ASCII
    names. The hash depends on the exact string only (no normalisation), so it is the same in every process.
    An ASCII condition keeps its plain form (the names saved artifacts already use): `a=b` and `a_b` share one.
    """
    plain = _NOT_ASCII_ALNUM.sub("_", condition)
    if condition.isascii():
        return plain
    digest = hashlib.sha256(condition.encode("utf-8")).hexdigest()[:8]
    return f"{plain}_{digest}"


# ---------------------------------------------------------------------------------------------------------------
# Ranker variants: which feature groups a ranker reads on top of the base features

VARIANTS = ("base", "lum", "pooled-history", "lum+pooled", "din", "din+lum")
LUM_VARIANTS = ("lum", "lum+pooled", "din+lum")  # read the LUM user and item vectors
HISTORY_VARIANTS = ("pooled-history", "lum+pooled", "din", "din+lum")  # read the recent-items history
# weigh each recent behaviour by its relevance to the candidate (DIN's target attention) instead of mean-pooling
# them; they also read when each behaviour happened (HISTORY_TIMES)
ATTENTION_VARIANTS = ("din", "din+lum")

# ---------------------------------------------------------------------------------------------------------------
# Counters

# Columns of the offline stats tables and of Feast's user_stats / item_stats views (feature_store/offline_tables.py)
USER_STATS_COLUMNS = ("user_n_events", "user_n_clicks", "user_ctr", "user_recent_ctr", "user_last_event_s")
# beside them in user_stats.parquet, never a feature: the last labels as bits, the real-time stream's state
LABEL_BITS_COLUMN = "user_recent_label_bits"
ITEM_COUNTERS = ("item_n_impressions", "item_n_clicks", "item_ctr")
# In a training-set row the last event's time becomes the request-relative `user_hours_since_last` (named apart
# from feature_store/online.py's USER_COUNTERS, which are the stats view's columns, the last event's time included)
USER_ROW_COUNTERS = (*USER_STATS_COLUMNS[:-1], "user_hours_since_last")
COUNTER_COLUMNS = (*USER_ROW_COUNTERS, *ITEM_COUNTERS)

# ---------------------------------------------------------------------------------------------------------------
# The training set (one row per impression; see feature_store/training_set.py for the whole layout)

TRAINING_SET_METADATA_KEY = "lum.training_set"  # schema metadata (JSON) naming the column groups below
CATEGORY_COLUMN = "item_category"
HISTORY_ITEMS = "hist_item_ids"
HISTORY_CATEGORIES = "hist_categories"
HISTORY_TIMES = "hist_ts"  # seconds since the epoch of each history item's event (float64), aligned with HISTORY_ITEMS
SEQUENCE_COLUMNS = (HISTORY_ITEMS, HISTORY_CATEGORIES, HISTORY_TIMES)
LUM_USER_PREFIX = "lum_user__"
LUM_ITEM_COLUMN = "lum_item"
FLAG_COLUMNS = ("missing_user_stats", "missing_item_stats")  # request-time facts: whether the counters exist
MISSING_LUM_COLUMN = "missing_lum"


def lum_user_column(condition: str) -> str:
    """The training-set column of a condition's user-interest vector: `lum_user__<slug>`."""
    return LUM_USER_PREFIX + slug(condition)
