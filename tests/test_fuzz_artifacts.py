"""Fuzz every artifact reader: damaged or edited files end in one clean line, never anything else.

Seeds (built once, from a tiny random model): a W4 g32 checkpoint, the same checkpoint with a
task's scales swapped in, a Δs file, a LoRA adapter, a calibration file and a training state.
Each is mutated (fuzz_util.py: truncations at every region, byte flips in header and body,
well-formed headers that lie about dtypes, shapes and offsets, 1 TB tensors, garbage, manifests
with missing / extra / ill-typed / huge / path-like fields) and handed to the reader a command
uses. Allowed outcomes: QtoolError with a one-line message, or, for a checkpoint, loading a
model identical to the seed (a manifest edit to a free-form field such as `created`). Anything
else (another exception, a multi-line message, a different model accepted, a case over its
time limit) fails the test, which prints the RNG seed: QTOOL_FUZZ_SEED=<seed> reproduces it.

QTOOL_FUZZ_REPORT=path.json writes the counts per artifact, mutation and outcome
(docs/reliability.md quotes them).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fuzz_util import flips, garbage, header_edits, manifest_edits, reseal, truncations
from peqa_util import byte_tokenizer, saved_tiny_checkpoint

from qtool import swap
from qtool.artifact.adapter import AdapterSpec, check_adapter, read_adapter, save_adapter
from qtool.artifact.checkpoint import load_checkpoint
from qtool.artifact.delta import check_delta, expected_shape, read_delta, save_delta
from qtool.data import calib
from qtool.errors import QtoolError
from qtool.nn.replace import quant_linears
from qtool.train.state import TrainState, load_state, save_state

SEED = int(os.environ.get("QTOOL_FUZZ_SEED", random.SystemRandom().randrange(1 << 31)))
CASE_SECONDS = 20


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    ck = root / "ck"
    info = saved_tiny_checkpoint(ck, 4, 32)
    gen = torch.Generator().manual_seed(0)
    delta = root / "delta.safetensors"
    save_delta(delta, {n: 1e-3 * torch.randn(expected_shape(e), generator=gen) for n, e in info["modules"].items()},
               info, task="t", steps=1, lr=1e-5, seed=0, metric_name="loss", metric=1.0)
    swapped = root / "ck-swapped"
    swap.swap_scales_dir(ck, delta, swapped)
    model = load_checkpoint(ck, with_tokenizer=False).model
    layers = quant_linears(model)
    adapter = root / "adapter"
    tensors = {n: {"lora_A.weight": torch.randn(4, m.in_features, generator=gen),
                   "lora_B.weight": torch.randn(m.out_features, 4, generator=gen)}
               for n, m in layers.items() if n.endswith(("q_proj", "v_proj"))}
    save_adapter(adapter, tensors, AdapterSpec(4, 8.0, targets=("q_proj", "v_proj")), info["fingerprint"])
    tok = byte_tokenizer()
    cal = root / "calib.safetensors"
    ids = torch.randint(0, 256, (4, 16), generator=gen)
    calib.save(calib.CalibrationSet(ids, {"format": "pt", "qtool.kind": calib.KIND, "n": "4", "seqlen": "16",
                                          "tokenizer_fingerprint": calib.tokenizer_fingerprint(tok)}), cal)
    state = root / "state.safetensors"
    params = {f"p{i}": torch.randn(3, 5, generator=gen) for i in range(3)}
    save_state(state, TrainState(7, params, {k: v + 1 for k, v in params.items()},
                                 {k: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(v),
                                      "exp_avg_sq": torch.ones_like(v)} for k, v in params.items()},
                                 torch.get_rng_state(), [], {"lr": 1e-3}, [{"step": 0, "loss": 1.0}], None, 10, 1.5))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    return {"root": root, "ck": ck, "info": info, "swapped": swapped, "delta": delta, "adapter": adapter,
            "layers": layers, "calib": cal, "tok": tok, "state": state, "params": sorted(params), "ref": ref}


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self.unclean: list[str] = []

    def run(self, artifact: str, kind: str, fn, accept=None) -> None:
        """fn() reads the mutated artifact; accept(result) names a harmless acceptance, or returns None."""
        def alarm(*_):
            raise TimeoutError(f"over {CASE_SECONDS} s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(CASE_SECONDS)
        t0 = time.perf_counter()
        try:
            result = fn()
        except QtoolError as e:
            outcome = "refused" if "\n" not in str(e) and str(e) else "unclean: multi-line or empty message"
        except Exception as e:  # noqa: BLE001 (exactly what the fuzz looks for)
            outcome = f"unclean: {type(e).__name__}: {str(e)[:120]}"
        else:
            outcome = (accept(result) if accept is not None else None) or "unclean: accepted"
        finally:
            self.seconds[artifact] += time.perf_counter() - t0
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.counts[(artifact, kind.split("=")[0], outcome.split(":")[0])] += 1
        if outcome.startswith("unclean"):
            self.unclean.append(f"{artifact} / {kind}: {outcome}")


def _file_mutations(data: bytes, rng: random.Random, sealed: bool, k: int = 45,
                    tensors: int = 4) -> list[tuple[str, bytes]]:
    cases = truncations(data, rng, 12) + flips(data, rng, k, "header") + flips(data, rng, k, "body")
    edits = header_edits(data, rng, tensors)
    cases += edits + garbage(rng, data)
    if sealed:  # the same edits with a matching content hash: the reader's own checks must catch them
        cases += [(f"{k}+resealed", r) for k, b in edits if (r := reseal(b)) is not None]
    return cases


def test_fuzz_readers(seeds, tmp_path):
    rng = random.Random(SEED)
    print(f"fuzz seed {SEED} (QTOOL_FUZZ_SEED={SEED} reproduces this run)")
    t = Tally()
    work = tmp_path / "w"
    info = seeds["info"]

    # Δs: read as swap-scales and eval --delta do, then checked against the checkpoint
    def read_checked_delta(p: Path):
        check_delta(read_delta(p), info)

    for kind, data in _file_mutations(seeds["delta"].read_bytes(), rng, sealed=True):
        p = work.with_suffix(".safetensors")
        p.write_bytes(data)
        t.run("delta", kind, lambda p=p: read_checked_delta(p))

    # adapter: weights and adapter_config.json
    def read_checked_adapter(d: Path):
        check_adapter(read_adapter(d), seeds["layers"], info["fingerprint"])

    src = seeds["adapter"]
    seed_adapter = read_adapter(src)

    def same_tensors(_) -> str | None:
        # qtool metadata stripped whole: indistinguishable from an adapter PEFT wrote, which
        # carries no hash; accepted only while the tensors are the seed's
        got = read_adapter(d)
        same = all(torch.equal(got.tensors[m][k], v) for m, parts in seed_adapter.tensors.items()
                   for k, v in parts.items()) and got.tensors.keys() == seed_adapter.tensors.keys()
        return "accepted, same tensors" if same else None

    d = _copy_dir(src, tmp_path / "ad")
    for kind, data in _file_mutations((src / "adapter_model.safetensors").read_bytes(), rng, sealed=True):
        (d / "adapter_model.safetensors").write_bytes(data)
        t.run("adapter weights", kind, lambda d=d: read_checked_adapter(d), same_tensors)
    cfg_text = (src / "adapter_config.json").read_bytes()
    cfg = json.loads(cfg_text)
    d = _copy_dir(src, tmp_path / "ad")
    for kind, value in _json_edits(cfg, rng) + _text_mutations(cfg_text, rng):
        (d / "adapter_config.json").write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        t.run("adapter config", kind, lambda d=d: read_checked_adapter(d))

    # calibration file, read with the model's tokenizer as quantize --calib does
    for kind, data in _file_mutations(seeds["calib"].read_bytes(), rng, sealed=True):
        p = work.with_suffix(".calib")
        p.write_bytes(data)
        t.run("calibration", kind, lambda p=p: calib.load(p, seeds["tok"], 258))

    # training state, read as finetune --resume does
    for kind, data in _file_mutations(seeds["state"].read_bytes(), rng, sealed=True):
        p = work.with_suffix(".state")
        p.write_bytes(data)
        t.run("train state", kind, lambda p=p: load_state(p, seeds["params"]))

    # checkpoint: the manifest, then every file (damaged, and edited with the manifest's sha256 updated)
    ref = seeds["ref"]

    def identical(loaded) -> str | None:
        if loaded.info.get("scale_delta"):  # the swapped seed: compare its base scales instead
            same = loaded.info["fingerprint"] == info["fingerprint"] and loaded.info["modules"] == info["modules"]
            base = loaded.model._qtool_base_scales
            same = same and all(torch.equal(base[n], ref[f"{n}.scales"]) for n in info["modules"])
            sd = loaded.model.state_dict()
            same = same and all(torch.equal(sd[k], v) for k, v in ref.items() if not k.endswith(".scales"))
            return "accepted, same model" if same else None
        ck = loaded
        sd = ck.model.state_dict()
        same = (sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
                and ck.info["modules"] == info["modules"] and ck.info["fingerprint"] == info["fingerprint"])
        return "accepted, same model" if same else None

    def hash_updated(ck) -> str | None:
        # config.json edited and its sha256 updated in the manifest: a deliberate edit that
        # transformers accepts; the stored tensors must still load unchanged
        return "accepted, hash-updated config" if identical(ck) else None

    def load(d: Path):
        return load_checkpoint(d, with_tokenizer=False)

    ck = seeds["ck"]
    d = _copy_dir(ck, tmp_path / "ck")
    manifest = (ck / "qtool.json").read_bytes()
    for kind, value in manifest_edits(json.loads(manifest), rng) + _text_mutations(manifest, rng):
        (d / "qtool.json").write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        t.run("checkpoint manifest", kind, lambda: load(d), identical)
    (d / "qtool.json").write_bytes(manifest)
    swapped = _copy_dir(seeds["swapped"], tmp_path / "ck-swapped")
    swapped_manifest = (swapped / "qtool.json").read_bytes()
    for name in ("model.safetensors", "scales.safetensors", "config.json", "base_scales.safetensors"):
        if name == "base_scales.safetensors":  # a checkpoint with a task's scales swapped in
            d, ck, manifest = swapped, seeds["swapped"], swapped_manifest
        original = (ck / name).read_bytes()
        if name == "config.json":
            cases = [(k, json.dumps(v).encode()) for k, v in _json_edits(json.loads(original), rng)]
        else:
            cases = _file_mutations(original, rng, sealed=False, k=15, tensors=3)
        for kind, data in cases:
            (d / name).write_bytes(data)
            t.run(f"checkpoint {name}", kind, lambda d=d: load(d), identical)
            # each rebuilds a model skeleton (~0.2 s): a seeded sample of them keeps the fuzz in budget
            if (kind.startswith(("dtype", "shape", "offsets", "truncate", "tensor", "entry", "field", "extra"))
                    and rng.random() < (0.3 if name == "config.json" else 0.4)):
                _rehash(d, name)  # an edit with the manifest updated: the reader's own checks must catch it
                accept = hash_updated if name == "config.json" else identical
                t.run(f"checkpoint {name}", kind + "+rehashed", lambda d=d: load(d), accept)
                (d / "qtool.json").write_bytes(manifest)
        (d / name).write_bytes(original)
    ck = seeds["ck"]
    for name in ("tokenizer.json",):
        src_dir = ck
        data = (src_dir / name).read_bytes()
        for kind, mutated in _text_mutations(data, rng, 10):
            d = _copy_dir(src_dir, tmp_path / "ck")
            (d / name).write_bytes(mutated)
            t.run(f"checkpoint {name}", kind, lambda d=d: load_checkpoint(d), None)
    d = _copy_dir(ck, tmp_path / "ck")
    (d / "stray.safetensors").write_bytes(b"")
    t.run("checkpoint directory", "unlisted file", lambda d=d: load(d), None)

    total = sum(t.counts.values())
    _report(t, total)
    assert total >= 1000, total
    assert not t.unclean, f"seed {SEED}: {len(t.unclean)} unclean outcomes, e.g.\n" + "\n".join(t.unclean[:20])


def _report(t: Tally, total: int) -> None:
    by_outcome = collections.Counter()
    for (_, _, outcome), n in t.counts.items():
        by_outcome[outcome] += n
    print(f"fuzz seed {SEED}: {total} cases; " + ", ".join(f"{o}: {n}" for o, n in sorted(by_outcome.items())))
    print("seconds per artifact: " + ", ".join(f"{a} {s:.1f}" for a, s in t.seconds.most_common()))
    target = os.environ.get("QTOOL_FUZZ_REPORT")
    if target:
        rows = [{"artifact": a, "mutation": k, "outcome": o, "count": n} for (a, k, o), n in sorted(t.counts.items())]
        Path(target).write_text(json.dumps({"seed": SEED, "total": total, "outcomes": dict(by_outcome),
                                            "rows": rows}, indent=1) + "\n")


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _rehash(d: Path, name: str) -> None:
    info = json.loads((d / "qtool.json").read_text())
    info["files"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / "qtool.json").write_text(json.dumps(info, indent=2))


def _text_mutations(data: bytes, rng: random.Random, k: int = 25) -> list[tuple[str, bytes]]:
    out = [("truncate", data[:c]) for c in sorted({0, 1, len(data) // 2, len(data) - 1, rng.randrange(len(data))})]
    for _ in range(k):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        out.append(("flip", bytes(b)))
    out += [("random-bytes", rng.randbytes(64)), ("empty", b""), ("deep-json", b"[" * 100000),
            ("huge-int", b'{"a": ' + b"9" * 10000 + b"}"), ("not-object", b"[1, 2]")]
    return out


def _json_edits(obj: dict, rng: random.Random) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    wrong = [None, -1, 0, 10**30, 1e308, "x", [], {}, True, 2.5]
    for key in list(obj):
        m = dict(obj)
        m.pop(key)
        out.append(("field-missing", m))
        for v in rng.sample(wrong, 2):
            out.append(("field-ill-typed", {**obj, key: v}))
    out.append(("extra-field", {**obj, "extra": 1}))
    return out


@pytest.mark.skipif(not (Path(sys.executable).parent / "qtool").exists(), reason="qtool is not installed")
def test_fuzz_sample_through_the_cli(seeds, tmp_path):
    """A sample of damaged artifacts through the installed `qtool`, as subprocesses: exit 2, one
    stderr line, no traceback; the 1 TB header case under an address-space limit."""
    rng = random.Random(SEED + 1)
    ck, delta, adapter = seeds["ck"], seeds["delta"].read_bytes(), seeds["adapter"]
    files = {}
    for i, (kind, data) in enumerate(rng.sample(_file_mutations(delta, rng, sealed=True), 3)):
        files[f"delta-{i}-{kind}"] = data
    big = next(b for k, b in header_edits(delta, rng) if k == "shape-1TB")
    files["delta-1TB"] = big
    cases = []
    for name, data in files.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        cases.append((name, ["swap-scales", str(ck), str(p)]))
    for i, (kind, data) in enumerate(rng.sample(_text_mutations((ck / "qtool.json").read_bytes(), rng), 2)):
        d = _copy_dir(ck, tmp_path / f"ck-{i}")
        (d / "qtool.json").write_bytes(data)
        cases.append((f"manifest-{kind}", ["eval", str(d), "-q", "--seqlen", "16", "--max-windows", "1"]))
    bad_ad = _copy_dir(adapter, tmp_path / "bad-adapter")
    w = bad_ad / "adapter_model.safetensors"
    b = bytearray(w.read_bytes())
    b[-3] ^= 0x10
    w.write_bytes(bytes(b))
    cases.append(("adapter-flip", ["eval", str(ck), "--adapter", str(bad_ad), "-q", "--seqlen", "16",
                                   "--max-windows", "1"]))
    before = {p: p.read_bytes() for p in ck.iterdir()}
    limit = 6 * 1024**3  # address space: imports fit; a 1 TB allocation could not
    runner = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
              "sys.argv = ['qtool'] + sys.argv[1:]; from qtool.cli.app import main; main()")
    procs = [(name, subprocess.Popen([sys.executable, "-c", runner, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=tmp_path)) for name, args in cases]
    for name, p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 2, (SEED, name, err[-500:])
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (SEED, name, err[-500:])
    assert {p: p.read_bytes() for p in ck.iterdir()} == before
    assert len(cases) == 7
