"""End to end on the real default model (SmolLM2-135M from its PyPI GGUF): calibrate →
quantize rtn and gptq → eval, at CI-sized settings (2 CPU cores)."""

import json

import pytest

from tests.cli_util import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def _ppl(path):
    return [r["perplexity"]["ppl"] for r in json.loads(path.read_text())["rows"]]


def test_real_model_pipeline(capsys, workdir):
    cal = workdir / "calib.safetensors"
    code, _, err = run_cli(capsys, "calibrate", "-o", cal, "--n", "4", "--seqlen", "256", "-q")
    assert code == 0, err
    for method in ("rtn", "gptq"):
        code, out, err = run_cli(capsys, "quantize", "--method", method, "--bits", "4", "-g", "128", "--calib", cal,
                                 "-o", workdir / method, "-q", "--device", "cpu")
        assert code == 0, err
        info = json.loads((workdir / method / "qtool.json").read_text())
        assert len(info["modules"]) == 30 * 7  # every Linear of every block, lm_head left alone
        assert info["source"]["name"] == "smollm2-135m" and len(info["source"]["sha256"]) == 64
    code, _, err = run_cli(capsys, "eval", workdir / "rtn", "--baseline", "--seqlen", "256", "--max-windows", "3",
                           "--json", workdir / "rtn.json", "-q", "--device", "cpu")
    assert code == 0, err
    fp, rtn = _ppl(workdir / "rtn.json")
    code, _, err = run_cli(capsys, "eval", workdir / "gptq", "--seqlen", "256", "--max-windows", "3",
                           "--json", workdir / "gptq.json", "-q", "--device", "cpu", "--prompt", "The BBC said",
                           "--max-new-tokens", "8")
    assert code == 0, err
    (gptq,) = _ppl(workdir / "gptq.json")
    # A real 135M model on BBC news: fp ppl is O(10-40); 4-bit g128 costs some, never collapses.
    assert 5 < fp < 60
    assert fp < rtn < 1.6 * fp
    assert fp < gptq < 1.6 * fp
    assert json.loads((workdir / "gptq.json").read_text())["rows"][0]["generation"].strip()
