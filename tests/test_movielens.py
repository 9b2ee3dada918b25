"""MovieLens folders (100K, 1M, latest layouts) converted to the event-log contract."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.data.contract import ContractError
from pipelines.data.sources.movielens import load_movielens

ML_LATEST_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-latest-small"

FLAGS_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def event_rows(table: pa.Table) -> list[tuple]:
    """(user_id, item_id, ts, label, feedback, rating) rows in the table's order."""
    cols = ["user_id", "item_id", "ts", "label", "feedback", "rating"]
    return list(zip(*(table.column(c).to_pylist() for c in cols)))


def items_by_id(table: pa.Table) -> dict[str, tuple]:
    """item_id -> (title, year, genres, category)."""
    d = table.to_pydict()
    return {i: (t, y, g, c) for i, t, y, g, c in zip(d["item_id"], d["title"], d["year"], d["genres"], d["category"])}


def u_item_line(movie_id: int, title: str, genres: tuple[str, ...]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in FLAGS_100K)
    return f"{movie_id}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{flags}"


def write_latin1(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny folders in each layout


@pytest.fixture
def ml_100k(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    write_latin1(
        folder / "u.data",
        ["1\t10\t4\t881250949", "1\t20\t2\t881250950", "2\t10\t3\t891717742", "2\t30\t5\t878887116"],
    )
    write_latin1(
        folder / "u.item",
        [
            u_item_line(10, "Toy Story (1995)", ("Animation", "Children's", "Comedy")),
            u_item_line(20, "Café (1999)", ("Drama",)),
            u_item_line(30, "unknown", ("unknown",)),
            u_item_line(40, "Never Rated (1980)", ("Western",)),
        ],
    )
    write_latin1(folder / "u.user", ["1|24|M|technician|85711", "2|53|F|other|94043"])
    return folder


@pytest.fixture
def ml_1m(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    write_latin1(
        folder / "ratings.dat",
        ["1::1193::5::978300760", "1::661::3::978302109", "1::914::3.5::978301968", "2::1193::2::978298413"],
    )
    write_latin1(
        folder / "movies.dat",
        [
            "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
            "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
            "914::Café (1999)::Comedy|Romance",
            "260::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
        ],
    )
    write_latin1(folder / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072"])
    return folder


@pytest.fixture
def ml_latest_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-tiny"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "7,11,4.0,1000000000\n"
        "7,143410,3.5,1100000000\n"
        "8,11,0.5,1200000000\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "143410,Hyena Road,(no genres listed)\n"
        "5,Café Society (2016),Comedy\n",
        encoding="utf-8",
    )
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_100k_layout(ml_100k: Path):
    out = load_movielens(ml_100k)
    assert out.source == {"name": "movielens", "layout": "100k", "path": str(ml_100k), "like_threshold": 4.0}
    assert event_rows(out.events) == [
        ("1", "10", utc(1997, 12, 4, 15, 55, 49), 1, "liked", 4.0),
        ("1", "20", utc(1997, 12, 4, 15, 55, 50), 0, "disliked", 2.0),
        ("2", "30", utc(1997, 11, 7, 7, 18, 36), 1, "liked", 5.0),
        ("2", "10", utc(1998, 4, 4, 19, 22, 22), 0, "neutral", 3.0),
    ]
    assert out.events.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert out.events.schema.field("label").type == pa.int8()
    assert items_by_id(out.items) == {
        "10": ("Toy Story", 1995, "Animation|Children's|Comedy", "Animation"),
        "20": ("Café", 1999, "Drama", "Drama"),
        "30": ("unknown", None, "", "unknown"),
        "40": ("Never Rated", 1980, "Western", "Western"),
    }
    assert out.rejected.empty


def test_1m_layout(ml_1m: Path):
    out = load_movielens(ml_1m)
    assert out.source["layout"] == "1m"
    assert event_rows(out.events) == [
        ("1", "1193", utc(2000, 12, 31, 22, 12, 40), 1, "liked", 5.0),
        ("1", "914", utc(2000, 12, 31, 22, 32, 48), 0, "neutral", 3.5),
        ("1", "661", utc(2000, 12, 31, 22, 35, 9), 0, "neutral", 3.0),
        ("2", "1193", utc(2000, 12, 31, 21, 33, 33), 0, "disliked", 2.0),
    ]
    assert items_by_id(out.items) == {
        "1193": ("One Flew Over the Cuckoo's Nest", 1975, "Drama", "Drama"),
        "661": ("James and the Giant Peach", 1996, "Animation|Children's|Musical", "Animation"),
        "914": ("Café", 1999, "Comedy|Romance", "Comedy"),
        "260": ("Star Wars: Episode IV - A New Hope", 1977, "Action|Adventure|Fantasy|Sci-Fi", "Action"),
    }
    assert out.items.schema.field("year").type == pa.int64()


def test_latest_layout_tiny(ml_latest_tiny: Path):
    out = load_movielens(ml_latest_tiny)
    assert out.source["layout"] == "latest"
    assert event_rows(out.events) == [
        ("7", "11", utc(2001, 9, 9, 1, 46, 40), 1, "liked", 4.0),
        ("7", "143410", utc(2004, 11, 9, 11, 33, 20), 0, "neutral", 3.5),
        ("8", "11", utc(2008, 1, 10, 21, 20), 0, "disliked", 0.5),
    ]
    assert items_by_id(out.items) == {
        "11": ("American President, The", 1995, "Comedy|Drama|Romance", "Comedy"),
        "143410": ("Hyena Road", None, "", "unknown"),
        "5": ("Café Society", 2016, "Comedy", "Comedy"),
    }


def test_like_threshold_moves_label_and_feedback(ml_latest_tiny: Path):
    out = load_movielens(ml_latest_tiny, like_threshold=3.5)
    assert out.events.column("label").to_pylist() == [1, 1, 0]
    assert out.events.column("feedback").to_pylist() == ["liked", "liked", "disliked"]
    assert out.source["like_threshold"] == 3.5


def test_feedback_is_known_after_the_event(ml_100k: Path):
    contract = load_movielens(ml_100k).contract
    assert contract.condition_names == ["feedback"]
    assert "feedback" in contract.history_columns()
    assert "rating" in contract.history_columns()
    assert "feedback" not in contract.ranker_feature_columns()
    assert "rating" not in contract.ranker_feature_columns()
    assert contract.ranker_feature_columns() == []


def test_ml_latest_small():
    if not (ML_LATEST_SMALL / "ratings.csv").exists():
        pytest.skip(f"../shared/data/ml-latest-small not found: {ML_LATEST_SMALL} is needed for this test")
    out = load_movielens(ML_LATEST_SMALL)
    events = out.events
    assert out.source["layout"] == "latest"
    assert events.num_rows == 100836
    assert pc.count_distinct(events.column("user_id")).as_py() == 610
    assert out.items.num_rows == 9742
    assert out.rejected.empty
    positive_rate = pc.mean(events.column("label")).as_py()
    assert 0.4 < positive_rate < 0.6
    liked = pc.sum(pc.equal(events.column("feedback"), "liked")).as_py()
    assert liked == pc.sum(events.column("label")).as_py()
    first = events.slice(0, 1).to_pylist()[0]  # user 1's earliest rating
    assert first["user_id"] == "1" and first["ts"] == utc(2000, 7, 30, 18, 8, 19)
    items = items_by_id(out.items)
    assert items["1"] == ("Toy Story", 1995, "Adventure|Animation|Children|Comedy|Fantasy", "Adventure")
    assert set(events.column("item_id").unique().to_pylist()) <= set(items)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_folder_without_movielens_files(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ContractError) as err:
        load_movielens(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ("u.data", "u.item", "ratings.dat", "movies.dat", "ratings.csv", "movies.csv"):
        assert name in message


def test_missing_folder(tmp_path: Path):
    with pytest.raises(ContractError, match="not a folder"):
        load_movielens(tmp_path / "absent")


@pytest.mark.parametrize("missing", ["movies.dat"])
def test_ratings_without_movies(ml_1m: Path, missing: str):
    (ml_1m / missing).unlink()
    with pytest.raises(ContractError, match=r"movies\.dat is missing"):
        load_movielens(ml_1m)


def test_latest_ratings_without_movies(ml_latest_tiny: Path):
    (ml_latest_tiny / "movies.csv").unlink()
    with pytest.raises(ContractError, match=r"has ratings\.csv but not movies\.csv"):
        load_movielens(ml_latest_tiny)


def test_non_numeric_rating_fails_naming_the_file(ml_100k: Path):
    with (ml_100k / "u.data").open("a") as f:
        f.write("3\t40\tabc\t881250999\n")
    with pytest.raises(ContractError) as err:
        load_movielens(ml_100k)
    message = str(err.value)
    assert str(ml_100k / "u.data") in message
    assert "column 'rating'" in message
    assert "row 5: 'abc'" in message


def test_non_numeric_rating_is_quarantined(ml_100k: Path):
    with (ml_100k / "u.data").open("a") as f:
        f.write("3\t40\tabc\t881250999\n")
    out = load_movielens(ml_100k, on_bad="quarantine")
    assert out.events.num_rows == 4
    assert "3" not in out.events.column("user_id").to_pylist()
    assert len(out.rejected) == 1
    row = out.rejected.iloc[0]
    assert (row["row"], row["user_id"], row["item_id"], row["rating"], row["ts"]) == (5, "3", "40", "abc", "881250999")
    assert row["reason"].startswith("rating:")


def test_out_of_range_rating_fails(ml_latest_tiny: Path):
    with (ml_latest_tiny / "ratings.csv").open("a") as f:
        f.write("9,11,7.0,1000000000\n")
    with pytest.raises(ContractError, match=r"ratings\.csv: column 'rating'.*row 4: 7\.0"):
        load_movielens(ml_latest_tiny)


def test_empty_user_id_fails_naming_the_file(ml_1m: Path):
    with (ml_1m / "ratings.dat").open("a") as f:
        f.write("::661::4::978302200\n")
    with pytest.raises(ContractError) as err:
        load_movielens(ml_1m)
    message = str(err.value)
    assert str(ml_1m / "ratings.dat") in message
    assert "column 'user_id'" in message
    assert "row 5: ''" in message


def test_empty_user_id_is_quarantined(ml_1m: Path):
    with (ml_1m / "ratings.dat").open("a") as f:
        f.write("::661::4::978302200\n")
    out = load_movielens(ml_1m, on_bad="quarantine")
    assert out.events.num_rows == 4
    assert len(out.rejected) == 1
    row = out.rejected.iloc[0]
    assert (row["row"], row["user_id"], row["item_id"], row["rating"]) == (5, "", "661", "4.0")
    assert row["reason"].startswith("user_id:")


def test_unreadable_timestamp_is_quarantined_with_its_raw_value(ml_latest_tiny: Path):
    with (ml_latest_tiny / "ratings.csv").open("a") as f:
        f.write("9,11,4.0,yesterday\n")
    with pytest.raises(ContractError, match=r"ratings\.csv: column 'ts'.*row 4"):
        load_movielens(ml_latest_tiny)
    out = load_movielens(ml_latest_tiny, on_bad="quarantine")
    assert out.events.num_rows == 3
    assert out.rejected[["row", "ts"]].values.tolist() == [[4, "yesterday"]]
    assert out.rejected["reason"].iloc[0].startswith("ts:")


def test_malformed_line_fails_naming_the_file(ml_1m: Path):
    with (ml_1m / "ratings.dat").open("a") as f:
        f.write("3::661\n")
    with pytest.raises(ContractError, match=r"ratings\.dat: cannot be read"):
        load_movielens(ml_1m)


def test_bad_on_bad_value(ml_1m: Path):
    with pytest.raises(ValueError, match="on_bad"):
        load_movielens(ml_1m, on_bad="drop")


def test_latest_ratings_with_other_header_fails(ml_latest_tiny: Path):
    (ml_latest_tiny / "ratings.csv").write_text("user,movie,rating,timestamp\n7,11,4.0,1000000000\n")
    with pytest.raises(ContractError, match=r"ratings\.csv: cannot be read.*userId"):
        load_movielens(ml_latest_tiny)


def test_1m_movies_resaved_as_utf8(ml_1m: Path):
    text = (ml_1m / "movies.dat").read_bytes().decode("latin-1")
    (ml_1m / "movies.dat").write_bytes(text.encode("utf-8"))
    assert items_by_id(load_movielens(ml_1m).items)["914"][0] == "Café"


def test_the_papers_protocol_config_holds_out_each_users_last_rating(ml_1m: Path, tmp_path: Path):
    """configs/ml-1m.yaml on an ML-1M folder: leave-last-out per user (the last rating is the test row, the one
    before it the ranker-training row), label rating >= 4; its validation run holds out the second-last."""
    import pyarrow.parquet as pq

    from pipelines.paths import RunPaths
    from pipelines.run.config import load_run_config
    from pipelines.run.subruns import validation_config
    from pipelines.steps import data as data_steps

    config_file = Path(__file__).resolve().parents[1] / "configs" / "ml-1m.yaml"
    config = load_run_config(config_file, {"data.path": str(ml_1m), "run_dir": str(tmp_path / "run")})
    (protocol,) = config.protocols
    assert protocol.split == "per-user" and protocol.last_k == (1, 1) and config.data.like_threshold == 4.0
    assert config.lm.evaluate.max_users is None and config.seeds >= 3
    paths = RunPaths(config.run_dir)
    data_steps.import_movielens(paths, str(ml_1m), config.data.like_threshold, config.data.on_bad)
    data_steps.split(paths, protocol.split_config())
    windows = {w: pq.read_table(paths.split_file("per-user", w)).to_pandas() for w in ("pretrain", "train", "test")}
    # user 1 rated 1193 (5), 914 (3.5), 661 (3) in that order; user 2 one movie only
    test = windows["test"].set_index("user_id")
    assert test.loc["1", "item_id"] == "661" and test.loc["1", "label"] == 0 and test.loc["2", "item_id"] == "1193"
    assert windows["train"].set_index("user_id").loc["1", "item_id"] == "914"
    assert windows["pretrain"]["item_id"].tolist() == ["1193"] and len(windows["train"]) == 1
    assert validation_config(config).protocols[0].last_k == (1, 1)  # the validation row: the second-last rating
