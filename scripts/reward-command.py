#!/usr/bin/env python3
"""An example `kind = "command"` reward for safe: exact answer on the last number, over JSON lines.

safe starts this once and writes one JSON object per batch on stdin:
  {"prompts": [...], "completions": [...], "completion_ids": [[...]], "finish_reasons": [...], "answer": [...], ...}
(every data column is a list under its own name). Answer with one line:
  {"rewards": [1.0, 0.0, null, ...], "metrics": {"has_number": [1, 0, ...]}}
null means "not applicable" for that sample. Anything printed to stderr shows up in safe's log.
"""
import json
import re
import sys

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

print("exact-answer reward ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    answers = request.get("answer") or [None] * len(request["completions"])
    rewards, has_number = [], []
    for completion, answer in zip(request["completions"], answers):
        numbers = NUMBER.findall(completion)
        has_number.append(1 if numbers else 0)
        if answer is None:
            rewards.append(None)
        else:
            rewards.append(1.0 if numbers and float(numbers[-1]) == float(answer) else 0.0)
    print(json.dumps({"rewards": rewards, "metrics": {"has_number": has_number}}), flush=True)
