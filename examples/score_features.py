"""Read a request's features from the online store and score its candidates with a trained ranker, from Python.

Shows what a ranking stack does in process (what `lum serve`'s /rank does for it): `FeatureClient` reads the user's
and the candidates' features from the run's Feast online store (LUM vectors, counters, recent behaviours), the
answer becomes rows of the training-set contract, and `TrainedRanker` turns them into model inputs and scores.
The request (user, candidates, context) is the first one of the run's test window unless given.

    python examples/score_features.py runs/demo --model lightgbm --variant lum
    python examples/score_features.py runs/demo --user u7 --items i1,i2,i3 --context surface=home --context device=mobile
"""

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from feature_store.online import FeatureClient
from pipelines.paths import RunPaths
from pipelines.serve import default_protocol_key, ranker_folder
from ranker.train import TrainedRanker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `lum run` folder (its online store materialized)")
    parser.add_argument("--model", choices=["lightgbm", "dlrm"], default="lightgbm")
    parser.add_argument("--variant", default="lum", help="base, lum, pooled-history, lum+pooled, din, din+lum")
    parser.add_argument("--user", help="user id [default: the test window's first request's]")
    parser.add_argument("--items", help="comma-separated candidate item ids")
    parser.add_argument("--context", action="append", default=[], metavar="COLUMN=VALUE", help="request context (repeatable)")
    args = parser.parse_args()

    protocol = default_protocol_key(args.run)  # the run's first protocol's split, e.g. global
    ranker = TrainedRanker.load(ranker_folder(args.run, args.model, args.variant, protocol))
    context = dict(pair.split("=", 1) for pair in args.context)
    user, items = args.user, args.items.split(",") if args.items else None
    if user is None or items is None:  # the first request (user, time) of the test window, with its own context
        test = pq.read_table(RunPaths(args.run).split_file(protocol, "test")).to_pandas()
        request = test[(test.user_id == test.user_id.iloc[0]) & (test.ts == test.ts.iloc[0])]
        user, items = user or request.user_id.iloc[0], items or request.item_id.tolist()
        context = {c: request[c].iloc[0].item() if hasattr(request[c].iloc[0], "item") else request[c].iloc[0]
                   for c in ranker.schema.context_columns} | context

    client = FeatureClient(RunPaths(args.run).feature_repo_of(protocol))
    conditions = list(ranker.schema.lum_conditions.values())  # the query conditions this ranker reads (none: no LUM)
    answer = client.get_ranking_features(user, conditions, items)  # as of the store's clock (its materialized time)
    scores = ranker.score(answer.to_table(context))  # the rows in the training-set contract -> [N] click probabilities
    print(f"{args.model}/{args.variant} for user {user}, context {context}, LUM vectors found: {answer.user_vector_found.tolist()}")
    for item, score, found in sorted(zip(answer.item_ids, scores, answer.item_found), key=lambda r: -r[1]):
        print(f"  {item:>10}  {score:.4f}{'' if found else '  (unknown item: counters missing)'}")


if __name__ == "__main__":
    main()
