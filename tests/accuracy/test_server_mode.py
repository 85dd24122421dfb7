"""The accuracy harness against a server (run_accuracy.server_generator), on the CPU.

A stand-in OpenAI-compatible server answers /v1/completions by reading the prompt (token ids
of the character-level test tokenizer) and returning the needle's value it finds for the key
the question asks about, so the harness's whole client path (OpenAI client, token-id prompts,
max_tokens, concurrency, scoring) is exercised and the score tells right from wrong.
"""

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ACC = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"
sys.path.insert(0, str(ACC))
import run_accuracy as RA  # noqa: E402
import tasks as T  # noqa: E402

CHAR = T.CharTokenizer()
NEEDLE = re.compile(r"special magic numbers? for ([\w-]+) is: (\d+)")
QUESTION = re.compile(r"What is the special magic number for ([\w-]+) mentioned")


class _Handler(BaseHTTPRequestHandler):
    seen: list = []
    wrong_for: set = set()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions", self.path
        text = CHAR.decode(body["prompt"])
        values = dict(NEEDLE.findall(text))
        key = QUESTION.search(text).group(1)
        answer = " " + ("0000000" if key in self.wrong_for else values.get(key, "?")) + "."
        self.seen.append({"key": key, "max_tokens": body["max_tokens"],
                          "temperature": body["temperature"]})
        out = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "text": answer, "finish_reason": "stop",
                                       "logprobs": None}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())


def test_server_mode_scores_what_the_server_answers():
    pytest.importorskip("openai")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        generate, info = RA.server_generator(url, "stand-in", concurrency=4, timeout=30)
        assert info["mode"] == "server" and info["url"] == url
        opts = T.TaskOptions(haystack="builtin")
        samples = T.generate_samples(CHAR, "niah_multikey", 2048, 6, opts=opts)
        _Handler.wrong_for = {samples[1].meta.get("key") or
                              QUESTION.search(samples[1].prompt).group(1)}
        result = RA.run(CHAR, generate, ["niah_multikey"], [2048], 6, opts=opts,
                        groups={("niah_multikey", 2048): samples}, progress=False)
    finally:
        server.shutdown()
    scores = [r["score"] for r in result["records"]]
    assert scores == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # the one answered wrong scores 0
    assert len(_Handler.seen) == 6
    assert {s["max_tokens"] for s in _Handler.seen} == {T.TASKS["niah_multikey"].max_tokens}
    assert {s["temperature"] for s in _Handler.seen} == {0.0}
