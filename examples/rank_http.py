"""Call the ranking service's POST /rank over HTTP, the way any stack would (standard library only on the client).

Shows the request and the answer of `lum serve` (docs/deploy.md): a user, the request's context and the candidates
in, one click probability per candidate (in their order) out. Without --url the script starts `lum serve` on the run
folder at a free local port, waits until it answers, sends the test window's first request and stops it.

    python examples/rank_http.py runs/demo                                 # starts and stops `lum serve` itself
    python examples/rank_http.py runs/demo --url http://127.0.0.1:8000     # a service that is already running
    python examples/rank_http.py runs/tiny --allow-rolling                 # a run whose LUM features are rolling
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `body`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:  # 4xx/5xx still carry a JSON body saying why
        return error.code, json.load(error)


def start_service(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:  # a free port (another process could take it before the service binds it: fine here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "pipelines.cli", "--no-progress", "serve", "--run", str(args.run), "--model", args.model,
               "--variant", args.variant, "--protocol", args.protocol, "--port", str(port)] + (["--allow-rolling"] if args.allow_rolling else [])
    service = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"lum serve stopped ({service.returncode}):\n{service.stdout.read()}")
        try:
            call(f"{url}/healthz")  # 200, or 503 with its reasons: either way the service is up
            return service, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    service.kill()
    raise SystemExit("lum serve did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `lum run` folder")
    parser.add_argument("--url", help="a running service [default: start `lum serve` on the run]")
    parser.add_argument("--model", choices=["lightgbm", "dlrm"], default="lightgbm")
    parser.add_argument("--variant", default="lum")
    parser.add_argument("--protocol", default="global", help="the split whose ranker and test window are used")
    parser.add_argument("--allow-rolling", action="store_true", help="passed to `lum serve` (rolling LUM features)")
    args = parser.parse_args()

    # the request: the test window's first (user, time), its candidates and the context columns the ranker reads
    ranker = json.loads((args.run / "rankers" / f"{args.protocol}-{args.model}-{args.variant}" / "ranker.json").read_text())
    test = pq.read_table(args.run / "splits" / args.protocol / "test.parquet").to_pandas()
    rows = test[(test.user_id == test.user_id.iloc[0]) & (test.ts == test.ts.iloc[0])]
    context = {c: rows[c].iloc[0].item() if hasattr(rows[c].iloc[0], "item") else rows[c].iloc[0] for c in ranker["schema"]["context_columns"]}
    body = {"user_id": rows.user_id.iloc[0], "context": context, "item_ids": rows.item_id.tolist()}

    service, url = (None, args.url) if args.url else start_service(args)
    try:
        status, answer = call(f"{url}/rank", body)
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=30)
    print(f"POST {url}/rank {json.dumps(body)}\n-> {status}")
    if status != 200:
        raise SystemExit(json.dumps(answer))
    print(f"{answer['ranker']} (LM {answer['model_version']}), request time {answer['request_time']}:")
    for item, score in zip(answer["item_ids"], answer["scores"]):
        print(f"  {item:>10}  {score:.4f}")


if __name__ == "__main__":
    main()
