#!/usr/bin/env python3
"""An example `kind = "http"` reward server for safe (OpenRLHF's remote reward-model protocol), standard library only.

  python3 scripts/reward-server.py --port 8000

POST {"query": [prompt + completion, ...], "prompts": [...], "labels": [...]} answers
{"rewards": [...], "scores": [...], "extra_logs": {"has_number": [...]}}: 1.0 when the last number of the
completion equals the label, else 0.0 (null without a label). Prints "listening on PORT" once ready (--port 0 picks
a free port).
"""
import argparse
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rewards, has_number = [], []
        for query, prompt, label in zip(body["query"], body["prompts"], body["labels"]):
            completion = query[len(prompt):]
            numbers = NUMBER.findall(completion)
            has_number.append(1 if numbers else 0)
            if label is None:
                rewards.append(None)
            else:
                rewards.append(1.0 if numbers and float(numbers[-1]) == float(label) else 0.0)
        answer = json.dumps({"rewards": rewards, "scores": rewards, "extra_logs": {"has_number": has_number}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
