"""`bertforge serve`: every API endpoint against tiny real models and a real run, each bad input, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bertforge.cli import main
from bertforge.finetune import predict
from bertforge.monitor import read_metrics
from bertforge.serve import load_table, make_server
from bertforge.serve.inference import LIMITS, attention_probabilities
from serve_data import call, make_classifier, make_reader, make_run, make_tagger, ok, write_vocab
from training_data import make_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    tiny = make_pretrained(root / "tiny", write_vocab(root / "vocab"))
    live = root / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n", encoding="utf-8")
    return {"tiny": tiny, "classifier": make_classifier(root, tiny), "tagger": make_tagger(root, tiny),
            "reader": make_reader(root, tiny), "run": make_run(root), "live": live}


@pytest.fixture(scope="module")
def server(folders):
    table = load_table([str(folders[name]) for name in ("tiny", "classifier", "tagger", "reader")],
                       [str(folders["run"]), str(folders["live"])], torch.device("cpu"))
    httpd = make_server(table, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.url.rstrip("/")
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------------ models + pages

def test_models_are_listed_with_their_kind_and_labels(server, folders):
    listed = {m["name"]: m for m in ok(server, "/api/models")}
    assert {name: m["kind"] for name, m in listed.items()} == {
        "tiny": "pretraining", "classifier": "classify", "tagger": "ner", "reader": "qa"}
    assert listed["tiny"]["path"] == str(folders["tiny"])
    assert listed["classifier"]["labels"] == ["neg", "pos"] and listed["classifier"]["text_count"] == 1
    assert listed["tagger"]["labels"] == ["B-LOC", "B-PER", "O"]


def test_pages_are_served_from_the_package_and_reference_nothing_outside(server):
    pages = {}
    for path, content_type in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                               ("/static/style.css", "text/css")):
        with urllib.request.urlopen(server + path, timeout=30) as response:
            assert response.headers["Content-Type"].startswith(content_type)
            pages[path] = response.read().decode("utf-8")
    assert "bertforge playground" in pages["/"] and "/static/app.js" in pages["/"]
    links = re.findall(r'(?:src|href)="([^"]*)"', pages["/"])
    assert links and all(link.startswith(("/", "#", "data:")) for link in links), links
    external = re.findall(r"https?://[^\s\"')]+", pages["/static/app.js"] + pages["/static/style.css"])
    assert set(external) <= {"http://www.w3.org/2000/svg"}, external


# ------------------------------------------------------------------------------------------ fill-mask, NSP

def test_fill_mask_gives_the_cli_predictions_with_tokens_and_positions(server, folders, capsys):
    text = "the man went to the [MASK] . he bought a [MASK] of milk ."
    result = ok(server, "/api/fill-mask", {"model": "tiny", "text": text, "top_k": 4})
    assert result["tokens"][0] == "[CLS]" and result["tokens"][-1] == "[SEP]"
    positions = [mask["position"] for mask in result["masks"]]
    assert positions == [i for i, t in enumerate(result["tokens"]) if t == "[MASK]"] and len(positions) == 2
    assert main(["fill-mask", "--model", str(folders["tiny"]), text, "--top-k", "4", "--json", "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [[c["token"] for c in mask["candidates"]] for mask in result["masks"]] == [[c["token"] for c in row]
                                                                                      for row in cli]
    for mask, row in zip(result["masks"], cli):
        assert [c["score"] for c in mask["candidates"]] == pytest.approx([c["score"] for c in row], abs=1e-6)
        scores = [c["score"] for c in mask["candidates"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_fill_mask_on_chinese_characters_and_the_default_top_k(server):
    result = ok(server, "/api/fill-mask", {"model": "tiny", "text": "北京是中国的[MASK]都"})
    assert result["tokens"] == ["[CLS]", "北", "京", "是", "中", "国", "的", "[MASK]", "都", "[SEP]"]
    assert result["masks"][0]["position"] == 7 and len(result["masks"][0]["candidates"]) == 5


def test_nsp_gives_the_cli_probability(server, folders, capsys):
    a, b = "the man went to the store .", "penguins are flightless birds ."
    result = ok(server, "/api/nsp", {"model": "tiny", "a": a, "b": b})
    assert main(["nsp", "--model", str(folders["tiny"]), a, b, "--json", "--device", "cpu"]) == 0
    assert result["is_next"] == pytest.approx(json.loads(capsys.readouterr().out)["is_next"], abs=1e-6)
    assert 0 < result["is_next"] < 1


# ------------------------------------------------------------------------------------------ attention

def test_attention_returns_a_distribution_per_layer_head_and_query(server):
    result = ok(server, "/api/attention", {"model": "tiny", "text": "the man went", "text_b": "he bought milk"})
    assert result["tokens"] == ["[CLS]", "the", "man", "went", "[SEP]", "he", "bought", "milk", "[SEP]"]
    assert (result["layers"], result["heads"]) == (2, 2)
    weights = torch.tensor(result["weights"])
    assert weights.shape == (2, 2, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 9), atol=1e-3, rtol=0)
    assert not torch.allclose(weights[0, 0], weights[0, 1])  # heads differ
    fine_tuned = ok(server, "/api/attention", {"model": "tagger", "text": "john lives in paris ."})
    assert torch.tensor(fine_tuned["weights"]).shape == (2, 2, 7, 7)


def test_attention_probabilities_reproduce_each_attention_block(folders):
    """The recomputed softmax(q k^T / sqrt(d)), applied to v, gives exactly what each layer's attention block
    outputs, so the heatmaps are the weights the model used."""
    from bertforge.model_folder import load_model

    model = load_model(folders["tiny"]).model.eval()
    input_ids = torch.tensor([[2, 10, 11, 12, 3, 13, 14, 3]])
    types = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    inputs, outputs = [], []

    def record(module, args, output) -> None:
        inputs.append(args[0])
        outputs.append(output)

    hooks = [layer.attention.register_forward_hook(record) for layer in model.bert.encoder.layers]
    probabilities = attention_probabilities(model.bert, input_ids, types)
    for hook in hooks:
        hook.remove()
    assert probabilities.shape == (2, 2, 8, 8)
    for layer, block in enumerate(model.bert.encoder.layers):
        attention = block.attention
        x = inputs[layer]
        v = attention.value(x).view(1, 8, 2, -1).transpose(1, 2)  # (1, heads, T, D)
        context = (probabilities[layer][None] @ v).transpose(1, 2).reshape(x.shape)
        expected = attention.layer_norm(x + attention.output(context))
        torch.testing.assert_close(outputs[layer], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ fine-tuned predict

def test_classify_gives_label_probabilities_as_predict_does(server, folders, tmp_path):
    result = ok(server, "/api/predict", {"model": "classifier", "text": "an awful film"})
    assert set(result["scores"]) == {"neg", "pos"} and sum(result["scores"].values()) == pytest.approx(1)
    assert result["label"] == max(result["scores"], key=result["scores"].get)
    (tmp_path / "in.tsv").write_text("sentence\nan awful film\n", encoding="utf-8")
    predict(folders["classifier"], tmp_path / "in.tsv", tmp_path / "out.tsv", device="cpu")
    assert (tmp_path / "out.tsv").read_text().splitlines()[1].split("\t")[-1] == result["label"]


def test_ner_marks_entities_with_character_offsets(server):
    text = "John lives in Paris."
    result = ok(server, "/api/predict", {"model": "tagger", "text": text})
    assert result["entities"] == [{"type": "PER", "start": 0, "end": 4, "text": "John"},
                                  {"type": "LOC", "start": 14, "end": 19, "text": "Paris"}]


def test_qa_answers_with_a_span_of_the_context_as_predict_does(server, folders, tmp_path):
    context, question = "john lives in paris .", "where does john live ?"
    result = ok(server, "/api/predict", {"model": "reader", "question": question, "context": context})
    assert context[result["start"]:result["end"]] == result["answer"] != ""
    assert 0 < result["score"] <= 1
    squad = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [{"id": "q", "question": question}]}]}]}
    (tmp_path / "in.json").write_text(json.dumps(squad), encoding="utf-8")
    predict(folders["reader"], tmp_path / "in.json", tmp_path / "out.json", device="cpu")
    assert json.loads((tmp_path / "out.json").read_text())["q"] == result["answer"]


def test_requests_for_one_model_queue_and_all_succeed(server):
    body = {"model": "tiny", "text": "the [MASK] went to the store .", "top_k": 3}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(server, "/api/fill-mask", body), range(16)))
    assert all(status == 200 for status, _ in results)
    assert all(data == results[0][1] for _, data in results)


def test_one_request_at_a_time_uses_a_model(server, monkeypatch):
    from bertforge.serve import inference

    active, most = [0], [0]
    guard = threading.Lock()
    real = inference.next_sentence

    def counting(*args):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)
            return real(*args)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(inference, "next_sentence", counting)
    body = {"model": "tiny", "a": "the man went to the store .", "b": "he bought milk ."}
    with ThreadPoolExecutor(6) as pool:
        statuses = [status for status, _ in pool.map(lambda _: call(server, "/api/nsp", body), range(6))]
    assert statuses == [200] * 6 and most[0] == 1


# ------------------------------------------------------------------------------------------ runs

def test_runs_list_info_and_metrics_rows(server, folders):
    assert ok(server, "/api/runs") == [{"name": "RUN", "path": str(folders["run"])},
                                       {"name": "live", "path": str(folders["live"])}]
    info = ok(server, "/api/runs/RUN")
    assert info["checkpoints"] == ["step_0000003", "step_0000006"] and info["config"]["model"]["num_hidden_layers"] == 2
    rows = ok(server, "/api/runs/RUN/metrics")
    assert rows == read_metrics(folders["run"] / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("split") == "validation"] == [3, 6]
    assert all("loss" in r for r in rows if "split" not in r)
    assert ok(server, "/api/runs/live") == {"name": "live", "path": str(folders["live"]), "config": None,
                                            "checkpoints": []}


def test_metrics_are_read_afresh_and_non_finite_values_become_null(server, folders):
    with open(folders["live"] / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 2, "loss": float("nan"), "event": "nonfinite_loss"}) + "\n")
        handle.write(json.dumps({"step": 3, "loss": 4.0}) + "\n" + '{"step": 4, "lo')  # a torn line being written
    assert ok(server, "/api/runs/live/metrics") == [{"step": 1, "loss": 5.0},
                                                    {"step": 2, "loss": None, "event": "nonfinite_loss"},
                                                    {"step": 3, "loss": 4.0}]


# ------------------------------------------------------------------------------------------ bad input

FILL = "/api/fill-mask"
TOO_MANY_TOKENS = "a " * 700 + "[MASK]"  # under the character cap, over the 512 positions
BAD_REQUESTS = [
    (FILL, b"{not json", 400, "not valid JSON"),
    (FILL, b"[1, 2]", 400, "must be a JSON object"),
    (FILL, b"\xff\xfe{}", 400, "not UTF-8"),
    (FILL, {"text": "a [MASK]"}, 400, "'model' is required"),
    (FILL, {"model": "nope", "text": "a [MASK]"}, 404, "no model named 'nope'"),
    (FILL, {"model": "tiny"}, 400, "'text' is required"),
    (FILL, {"model": "tiny", "text": 5}, 400, "'text' must be a str"),
    (FILL, {"model": "tiny", "text": "a [MASK]", "top_k": True}, 400, "'top_k' must be a int"),
    (FILL, {"model": "tiny", "text": "a [MASK]", "topk": 3}, 400, "unknown field 'topk'"),
    (FILL, {"model": "tiny", "text": "the man went"}, 400, "has no [MASK]"),
    (FILL, {"model": "tiny", "text": "[MASK] " * 21}, 400, "at most 20 at once"),
    (FILL, {"model": "tiny", "text": "a [MASK]", "top_k": 0}, 400, "top_k must be between 1 and 50"),
    (FILL, {"model": "tiny", "text": "a [MASK]", "top_k": 51}, 400, "top_k must be between 1 and 50"),
    (FILL, {"model": "tiny", "text": "a" * 2001 + "[MASK]"}, 400, "at most 2000"),
    (FILL, {"model": "tiny", "text": TOO_MANY_TOKENS}, 400, "this model takes at most 512"),
    (FILL, {"model": "tiny", "text": "   "}, 400, "text is empty"),
    (FILL, {"model": "classifier", "text": "a [MASK]"}, 400, "fill-mask needs a pretraining model"),
    ("/api/nsp", {"model": "tagger", "a": "x", "b": "y"}, 400, "NSP needs a pretraining model"),
    ("/api/nsp", {"model": "tiny", "a": "x"}, 400, "'b' is required"),
    ("/api/attention", {"model": "tiny", "text": "the " * 70}, 400, "attention is shown for at most 64"),
    ("/api/predict", {"model": "tiny", "text": "a good film"}, 400, "predict needs a fine-tuned"),
    ("/api/predict", {"model": "classifier", "text": "good", "text_b": "bad"}, 400, "leave out text_b"),
    ("/api/predict", {"model": "classifier", "question": "q", "context": "c"}, 400, "unknown field 'context'"),
    ("/api/predict", {"model": "reader", "text": "john"}, 400, "unknown field 'text'"),
    ("/api/predict", {"model": "reader", "question": "", "context": "c"}, 400, "question is empty"),
    ("/api/predict", {"model": "reader", "question": "q", "context": "c" * 10001}, 400, "at most 10000"),
    ("/api/predict", {"model": "reader", "question": "q" * 501, "context": "c"}, 400, "at most 500"),
    ("/api/nope", {"model": "tiny"}, 404, "no such endpoint: POST /api/nope"),
    (FILL, b"{" + b" " * (256 * 1024) + b"}", 413, "at most 262144"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_REQUESTS,
                         ids=[f"{i}-{m[:28]}" for i, (_, _, _, m) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_4xx_and_one_line(server, path, body, status, message):
    got, data = call(server, path, raw=body) if isinstance(body, bytes) else call(server, path, body)
    assert got == status and list(data) == ["error"], data
    assert message in data["error"] and "\n" not in data["error"], data


@pytest.mark.parametrize("path", ["/api/nope", "/api/runs/nope/metrics", "/api/runs/..%2F..%2Fetc/metrics",
                                  "/api/runs/RUN/config.json", "/static/../app.py", "/static/app.py",
                                  "/api/runs/RUN/metrics/more"])
def test_unknown_paths_are_404_and_never_read_files(server, path):
    status, data = call(server, path)
    assert status == 404 and list(data) == ["error"], data


def test_caps_are_the_documented_ones():
    assert LIMITS == {"text_chars": 2000, "question_chars": 500, "context_chars": 10000, "masks": 20, "top_k": 50,
                      "attention_tokens": 64}


# ------------------------------------------------------------------------------------------ the command

def test_cli_refuses_bad_folders_in_one_line_before_serving(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(tmp_path / "empty")], "not a model, checkpoint or run folder"),
        (["--run", str(tmp_path / "empty")], "is not a run folder"),
        (["--model", f"a={folders['tiny']}", f"a={folders['classifier']}"], "two models are named 'a'"),
        ([], "nothing to serve"),
        (["--model", str(folders["tiny"]), "--port", "70000"], "--port must be between 0 and 65535"),
        (["--run", str(folders["run"]), "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1:"),
    ]
    with taken:
        for flags, message in cases:
            assert main(["serve", *flags]) == 2, flags
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1 and err.startswith("bertforge: error:"), err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_until_ctrl_c_and_stops_cleanly(folders, stop):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bertforge", "serve", "--model", f"mini={folders['tiny']}",
                                "--run", str(folders["run"]), "--port", "0", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match and "1 model(s), 1 run(s)" in line, line + process.stderr.read()
        base = match.group(1).rstrip("/")
        assert [m["name"] for m in ok(base, "/api/models")] == ["mini"]
        assert ok(base, "/api/runs") == [{"name": "RUN", "path": str(folders["run"])}]
        process.send_signal(stop)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"serve did not stop within 30 s of {stop.name}; its stderr:\n{process.communicate()[1]}")
        assert code == 0
        assert "bertforge serve: stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
