"""MovieLens folders (100K, 1M, latest/25M layouts) converted to the event-log contract.

GroupLens publishes MovieLens in three file layouts; the layout is detected from the files a folder holds:

    100k    `u.data`  tab-separated, no header: user id, item id, rating (1-5), unix seconds
            `u.item`  pipe-separated, latin-1: movie id | title | release date | video release date | IMDb URL |
                      19 genre flags (0/1) in the order of `GENRES_100K`
            (`u.user` and the other files are not used)
    1m      `ratings.dat`  `UserID::MovieID::Rating::Timestamp` (rating 1-5, unix seconds)
            `movies.dat`   `MovieID::Title::Genres`, genres pipe-separated, latin-1
            (`users.dat` is not used; the 10M release has the same two files and loads as this layout)
    latest  `ratings.csv`  header `userId,movieId,rating,timestamp` (rating 0.5-5 in half stars, unix seconds)
            `movies.csv`   header `movieId,title,genres`; titles may hold quoted commas; the genres
                           "(no genres listed)" mean none. Used by ml-latest, ml-latest-small, 20M and 25M.

Every rating becomes one event: user_id and item_id as written in the files (strings), ts from the unix seconds,
and

    label     1 if rating >= like_threshold, else 0
    feedback  (condition, known after the event) "liked" if rating >= like_threshold, otherwise "disliked" if
              rating < 3, otherwise "neutral". MovieLens has no surface or device, so the condition of an event
              is its feedback level; it is known only once the user has rated, so it may be used inside a user's
              history but never as a feature of the event's own row.
    rating    (extra float64, known after the event) the rating itself.

A rating that is not a number between 0.5 and 5 is a bad row: it fails the load, or with `on_bad="quarantine"`
it is set aside with the other bad rows (null ids, bad times, duplicates) that the contract finds.

Items: item_id, title (without the trailing " (YYYY)"), year (int64, null when the title has none), genres
(pipe-joined, "" when none) and category (the first genre, or "unknown"). Every movie of the movies file is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from pipelines.data.contract import (
    ColumnSpec,
    ContractError,
    EventContract,
    ValidationOptions,
    validate_events,
    validate_items,
)
from pipelines.data.sources.base import SourceOutput

GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRES = "(no genres listed)"
MIN_RATING, MAX_RATING = 0.5, 5.0
MIN_TS = pd.Timestamp("1990-01-01", tz="UTC")
FEEDBACK_VALUES: tuple[str, ...] = ("liked", "neutral", "disliked")

MOVIELENS_CONTRACT = EventContract(
    conditions=(ColumnSpec("feedback", "condition", known_at="after_event"),),
    extras=(ColumnSpec("rating", "extra", known_at="after_event", dtype="float64"),),
)

_RAW_COLUMNS = ("user_id", "item_id", "rating", "ts")
_TITLE_YEAR = r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-\u2013]\d{0,4})?\)\s*$"


@dataclass(frozen=True)
class Layout:
    """One MovieLens file layout: its name and the ratings and movies file names."""

    name: str
    ratings: str
    movies: str


LAYOUTS: tuple[Layout, ...] = (
    Layout("latest", "ratings.csv", "movies.csv"),
    Layout("1m", "ratings.dat", "movies.dat"),
    Layout("100k", "u.data", "u.item"),
)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def load_movielens(path: str | Path, like_threshold: float = 4.0, on_bad: str = "fail") -> SourceOutput:
    """Load a MovieLens folder (100K, 1M or latest/25M layout, detected from its files) as contract events.

    label = 1 when rating >= `like_threshold`, else 0; the `feedback` condition is "liked" (rating >=
    `like_threshold`), "disliked" (rating < 3) or "neutral", known only after the event (see the module
    docstring). `on_bad` is "fail" (raise `ContractError` on the first bad rows) or "quarantine" (set bad rows
    aside in `SourceOutput.rejected`, each with its reason).
    """
    folder = Path(path)
    if on_bad not in ("fail", "quarantine"):
        raise ValueError(f"on_bad must be 'fail' or 'quarantine', got {on_bad!r}")
    if not isinstance(like_threshold, (int, float)) or not math.isfinite(like_threshold):
        raise ValueError(f"like_threshold must be a finite number, got {like_threshold!r}")
    layout = detect_layout(folder)
    ratings_file, movies_file = folder / layout.ratings, folder / layout.movies
    raw = read_ratings(ratings_file, layout.name)
    table, bad_rating = ratings_to_events(raw, like_threshold)
    if on_bad == "fail":
        _raise_on_bad_ratings(ratings_file, raw.column("rating"), bad_rating)
    options = ValidationOptions(ts_unit="s", on_bad=on_bad, min_ts=MIN_TS)  # type: ignore[arg-type]
    result = validate_events(table, MOVIELENS_CONTRACT, source=str(ratings_file), options=options)
    rejected = _explain_rejected(result.rejected, raw, bad_rating)
    items = validate_items(read_movies(movies_file, layout.name), source=str(movies_file))
    coercions = [
        f"label: 1 if rating >= {like_threshold:g}, else 0",
        f"feedback: 'liked' if rating >= {like_threshold:g}, 'disliked' if rating < 3, else 'neutral'",
        *result.coercions,
    ]
    return SourceOutput(
        events=result.events,
        items=items,
        source={"name": "movielens", "layout": layout.name, "path": str(folder), "like_threshold": like_threshold},
        rejected=rejected,
        coercions=coercions,
    )


def detect_layout(folder: Path) -> Layout:
    """The layout whose ratings file `folder` holds; ContractError when none, or when its movies file is missing."""
    expected = "; ".join(f"{layout.name}: {layout.ratings} + {layout.movies}" for layout in LAYOUTS)
    if not folder.is_dir():
        raise ContractError(f"{folder}: not a folder; expected a MovieLens folder holding one of ({expected})")
    for layout in LAYOUTS:
        if (folder / layout.ratings).is_file():
            if not (folder / layout.movies).is_file():
                raise ContractError(
                    f"{folder}: has {layout.ratings} but not {layout.movies} (MovieLens {layout.name} layout): "
                    f"{folder / layout.movies} is missing"
                )
            return layout
    raise ContractError(f"{folder}: no MovieLens files found; expected one of ({expected})")


# ---------------------------------------------------------------------------------------------------------------
# Ratings


def read_ratings(path: Path, layout: str) -> pa.Table:
    """Read a ratings file into columns user_id, item_id (strings), rating and ts.

    rating and ts are numbers when every row parses (the fast path); otherwise they are the raw strings and
    `ratings_to_events` marks the rows that do not parse.
    """
    try:
        return _read_ratings_as(path, layout, numeric=True)
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        pass
    try:
        return _read_ratings_as(path, layout, numeric=False)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        raise ContractError(f"{path}: cannot be read as a MovieLens {layout} ratings file: {exc}") from exc


def _read_ratings_as(path: Path, layout: str, numeric: bool) -> pa.Table:
    number_types = [pa.float64(), pa.int64()] if numeric else [pa.string(), pa.string()]
    types = dict(zip(_RAW_COLUMNS, [pa.string(), pa.string(), *number_types]))
    convert = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False)
    if layout == "latest":
        header = ["userId", "movieId", "rating", "timestamp"]  # selected by name from the file's header
        convert.column_types = dict(zip(header, types.values()))
        convert.include_columns = header
        table = pa_csv.read_csv(path, convert_options=convert)
        return table.rename_columns(list(_RAW_COLUMNS))
    if layout == "100k":
        read = pa_csv.ReadOptions(column_names=list(_RAW_COLUMNS))
        parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False)
        return pa_csv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    # 1m: `a::b::c::d` read with ':' as the delimiter gives empty columns between the fields.
    names = ["user_id", "_1", "item_id", "_2", "rating", "_3", "ts"]
    read = pa_csv.ReadOptions(column_names=names)
    parse = pa_csv.ParseOptions(delimiter=":", quote_char=False)
    convert.include_columns = list(_RAW_COLUMNS)
    return pa_csv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)


def _as_numbers(array: pa.ChunkedArray) -> np.ndarray:
    """float64 values of a numeric or string column; NaN where a value is null or not a number."""
    if pa.types.is_string(array.type):
        return pd.to_numeric(array.to_pandas(), errors="coerce").to_numpy(dtype=np.float64)
    return np.asarray(pc.fill_null(array.cast(pa.float64()), np.nan).to_numpy(), dtype=np.float64)


def ratings_to_events(raw: pa.Table, like_threshold: float) -> tuple[pa.Table, np.ndarray]:
    """Build the events table (before validation) and the mask of rows whose rating is not a valid rating.

    Rows with a bad rating get a null label, rating and feedback, so that validation rejects them too.
    """
    rating = _as_numbers(raw.column("rating"))
    bad_rating = ~((rating >= MIN_RATING) & (rating <= MAX_RATING))  # NaN compares False: bad
    if pa.types.is_string(raw.column("ts").type):
        ts_values = _as_numbers(raw.column("ts"))
        ts = pa.array(ts_values, mask=np.isnan(ts_values), type=pa.float64())
    else:
        ts = raw.column("ts")
    liked = rating >= like_threshold
    label = pa.array(liked.astype(np.int8), mask=bad_rating, type=pa.int8())
    codes = np.where(liked, 0, np.where(rating < 3, 2, 1)).astype(np.int8)
    feedback = pa.DictionaryArray.from_arrays(
        pa.array(codes, mask=bad_rating, type=pa.int8()), pa.array(FEEDBACK_VALUES, type=pa.string())
    )
    table = pa.table(
        {
            "user_id": raw.column("user_id"),
            "item_id": raw.column("item_id"),
            "ts": ts,
            "label": label,
            "feedback": feedback,
            "rating": pa.array(np.where(bad_rating, 0.0, rating), mask=bad_rating, type=pa.float64()),
        }
    )
    return table, bad_rating


def _bad_rating_text() -> str:
    return f"a number from {MIN_RATING:g} to {MAX_RATING:g}"


def _raise_on_bad_ratings(path: Path, raw_rating: pa.ChunkedArray, bad: np.ndarray, shown: int = 5) -> None:
    """Fail with the first rows whose rating is not a valid rating (as `validate_events` does for its columns)."""
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    values = raw_rating.take(pa.array(rows[:shown])).to_pylist()
    pairs = ", ".join(f"row {r + 1}: {'null' if v is None else repr(v)}" for r, v in zip(rows[:shown], values))
    more = f" (and {len(rows) - shown} more)" if len(rows) > shown else ""
    raise ContractError(
        f"{path}: column 'rating': {len(rows)} row(s) are not valid ratings; expected {_bad_rating_text()}. "
        f"First offending rows (1-based, header excluded): {pairs}{more}. "
        "Fix the input, or pass --on-bad quarantine to set such rows aside with a reason."
    )


def _explain_rejected(rejected: pd.DataFrame, raw: pa.Table, bad_rating: np.ndarray) -> pd.DataFrame:
    """Show rating and ts of rejected rows as read from the file, and name the rating as the reason where it is.

    (A file's "4" reads as 4.0 when the column parses as numbers; unparseable values are shown as written.)

    `validate_events` sees a null label for a bad rating; the row's reason then says so in terms of the rating.
    """
    if rejected.empty:
        return rejected
    rejected = rejected.copy()
    index = rejected["row"].to_numpy(dtype=np.int64) - 1
    for name in ("rating", "ts"):
        values = raw.column(name).take(pa.array(index)).to_pylist()
        rejected[name] = [None if v is None else str(v) for v in values]
    from_rating = bad_rating[index] & rejected["reason"].astype(str).str.startswith("label:").to_numpy()
    rejected.loc[from_rating, "reason"] = f"rating: is not a valid rating; expected {_bad_rating_text()}"
    return rejected


# ---------------------------------------------------------------------------------------------------------------
# Movies


def read_movies(path: Path, layout: str) -> pa.Table:
    """Read a movies file into the items table: item_id, title, year, genres, category."""
    if layout == "latest":
        frame = _read_movies_latest(path)
    elif layout == "1m":
        frame = _read_movies_1m(path)
    else:
        frame = _read_movies_100k(path)
    return _items_table(frame["item_id"], frame["title"], frame["genres"])


def _read_movies_latest(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [c for c in ("movieId", "title", "genres") if c not in frame.columns]
    if missing:
        raise ContractError(f"{path}: missing column(s) {', '.join(missing)}; the file has {', '.join(frame.columns)}")
    genres = frame["genres"].where(frame["genres"] != NO_GENRES, "")
    return pd.DataFrame({"item_id": frame["movieId"], "title": frame["title"], "genres": genres})


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a 100K/1M movies file: latin-1 as published, or UTF-8 where it was re-saved so."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return [line for line in text.splitlines() if line.strip()]


def _read_movies_1m(path: Path) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split("::")
        if len(parts) < 3:
            raise ContractError(f"{path}: row {number}: expected MovieID::Title::Genres, got {line!r}")
        rows.append((parts[0], "::".join(parts[1:-1]), parts[-1]))
    return pd.DataFrame(rows, columns=["item_id", "title", "genres"])


def _read_movies_100k(path: Path) -> pd.DataFrame:
    """u.item; the "unknown" genre flag means no genre and is not listed among the genres."""
    rows = []
    n_fields = 5 + len(GENRES_100K)
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split("|")
        if len(parts) != n_fields:
            raise ContractError(
                f"{path}: row {number}: expected {n_fields} pipe-separated fields (id, title, dates, URL, "
                f"{len(GENRES_100K)} genre flags), got {len(parts)}: {line!r}"
            )
        flags = parts[5:]
        genres = "|".join(g for g, f in zip(GENRES_100K, flags) if f.strip() == "1" and g != "unknown")
        rows.append((parts[0], parts[1], genres))
    return pd.DataFrame(rows, columns=["item_id", "title", "genres"])


def split_title_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split "Toy Story (1995)" into ("Toy Story", 1995); titles without a trailing year keep their text, year NA.

    A trailing year range such as "(1975-1979)" gives its first year.
    """
    parts = titles.str.extract(_TITLE_YEAR)
    has_year = parts["year"].notna()
    title = titles.str.strip().where(~has_year, parts["title"])
    year = pd.to_numeric(parts["year"], errors="coerce").astype("Int64")
    return title, year


def _items_table(item_id: pd.Series, titles: pd.Series, genres: pd.Series) -> pa.Table:
    title, year = split_title_year(titles.astype(str))
    genres = genres.astype(str).str.strip()
    category = genres.str.split("|", n=1).str[0].where(genres != "", "unknown")
    return pa.table(
        {
            "item_id": pa.array(item_id.astype(str).str.strip(), type=pa.string()),
            "title": pa.array(title, type=pa.string()),
            "year": pa.array(year, type=pa.int64()),
            "genres": pa.array(genres, type=pa.string()),
            "category": pa.array(category, type=pa.string()),
        }
    )
