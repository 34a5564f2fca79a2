"""Fuzz the readers: any bytes given as a safetensors file or a MindSpore ckpt either parse (and then every tensor
loads and hashes) or raise our own ``SdxlCkptError``; never another exception, never a hang.

Inputs are mutations of real small files (bit flips, overwrites, truncation, insertion, deletion) and generated
headers / records (valid structure with hostile values). Runs are derandomized and bounded (``max_examples``,
``deadline``), well under a minute; ``SDXL_CKPT_FUZZ_EXAMPLES`` raises the budget for a longer local run.
The count of malformed inputs tried is printed (``-s``), stored as a test property and shown in the terminal summary.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from sdxl_ckpt.errors import SdxlCkptError
from sdxl_ckpt.formats.ckpt_io import CRC_MARK, record_header, scan_ckpt, verify_crc, write_ckpt
from sdxl_ckpt.formats.dtypes import MS_TO_ST, ST_TO_NUMPY
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.safetensors_io import read_safetensors
from sdxl_ckpt.manage.hashing import hash_entries, hash_safetensors
from sdxl_ckpt.manage.inspect import inspect_checkpoint

EXAMPLES = int(os.environ.get("SDXL_CKPT_FUZZ_EXAMPLES", "400"))
HANG_SECONDS = 10.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=3000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATS: dict[str, Counter] = {"safetensors": Counter(), "ckpt": Counter()}
WORK = Path(tempfile.gettempdir())  # replaced by a fresh folder for this module (fixture ``work_dir``)


class ReaderHang(Exception):
    """Deliberately not an SdxlCkptError: a reader that needs this long on a few KiB is a bug."""


@contextmanager
def hang_guard(seconds: float = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise ReaderHang(f"reader still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exercise(kind: str, data: bytes) -> str:
    """Write ``data`` as a ``kind`` file and read it every way the tool does; 'parsed' or 'malformed'."""
    path = WORK / ("input.safetensors" if kind == "safetensors" else "input.ckpt")
    path.write_bytes(data)
    STATS[kind]["tried"] += 1
    try:
        with hang_guard():
            if kind == "safetensors":
                parsed = read_safetensors(path)
                for entry in parsed.entries:
                    array = entry.load()
                    assert array.shape == entry.shape and array.dtype == ST_TO_NUMPY[entry.dtype]
                hash_safetensors(parsed)
            else:
                parsed = scan_ckpt(path)
                for entry in parsed.entries:
                    array = entry.load()
                    assert array.shape == entry.shape and array.dtype == ST_TO_NUMPY[entry.dtype]
                hash_entries(parsed.entries)
                verify_crc(parsed)
            inspect_checkpoint(path, with_hash=True)
    except SdxlCkptError as err:
        assert str(err), "an error must say something"
        STATS[kind]["malformed"] += 1
        return "malformed"
    STATS[kind]["parsed"] += 1
    return "parsed"


# --- seeds: real small files ----------------------------------------------------------------------------------------


def _seed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.diffusion_model.out.2.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float16),
        "first_stage_model.decoder.norm_out.weight": rng.standard_normal(8).astype(np.float32),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": np.arange(7, dtype=np.int64)[None],
        "conditioner.embedders.1.model.logit_scale": np.array(4.6, dtype=np.float32),
        "conditioner.embedders.1.model.ln_final.bias": rng.integers(0, 65535, 5).astype(np.uint16),
    }


@pytest.fixture(scope="module")
def seed_safetensors(work_dir) -> bytes:
    path = WORK / "seed.safetensors"
    save_file(_seed_tensors(), path, metadata={"modelspec.title": "fuzz", "sdxl_ckpt.variant": "base"})
    return path.read_bytes()


@pytest.fixture(scope="module")
def seed_ckpt(work_dir) -> bytes:
    path = WORK / "seed.ckpt"
    entries = [entry_from_array(k, v) for k, v in _seed_tensors().items()]
    write_ckpt(path, entries, overwrite=True, crc=True)
    return path.read_bytes()


# --- mutations ------------------------------------------------------------------------------------------------------

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in mutations:
        at = where % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << arg
        elif kind == "set":
            out[at : at + len(arg)] = arg
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = arg
        elif kind == "delete":
            del out[at : at + arg]
    return bytes(out)


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def _mutated_safetensors(seed: bytes, mutations: list[tuple]) -> None:
    exercise("safetensors", mutate(seed, mutations))


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def _mutated_ckpt(seed: bytes, mutations: list[tuple]) -> None:
    exercise("ckpt", mutate(seed, mutations))


# --- generated safetensors headers ----------------------------------------------------------------------------------

HOSTILE_INT = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, -(2**63)]))
JSON_SCALAR = st.one_of(st.none(), st.booleans(), HOSTILE_INT, st.floats(allow_nan=False), st.text(max_size=8))
DTYPE = st.one_of(st.sampled_from(sorted(ST_TO_NUMPY)), st.sampled_from(["F8_E4M3", "f32", "", "I128"]), JSON_SCALAR)
TENSOR_INFO = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": DTYPE,
            "shape": st.one_of(st.lists(HOSTILE_INT, max_size=4), JSON_SCALAR),
            "data_offsets": st.one_of(st.lists(HOSTILE_INT, min_size=0, max_size=3), JSON_SCALAR),
        }
    ),
    JSON_SCALAR,
    st.dictionaries(st.text(max_size=12), JSON_SCALAR, max_size=3),
)
METADATA = st.one_of(
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    st.dictionaries(st.text(max_size=10), JSON_SCALAR, max_size=3),
    JSON_SCALAR,
)


def framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@st.composite
def generated_safetensors(draw) -> bytes:
    header: dict = draw(st.dictionaries(st.text(max_size=16), TENSOR_INFO, max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(METADATA)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=64)) if draw(st.booleans()) else raw[: draw(st.integers(0, len(raw)))]
    length = len(raw) if draw(st.integers(0, 3)) else draw(HOSTILE_INT.filter(lambda n: 0 <= n < 2**64))
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=256))


@FUZZ
@given(data=generated_safetensors())
@example(data=framed(b"[" * 20_000))  # nesting deep enough to exhaust the JSON recursion
@example(data=framed(b'{"a": ' + b"9" * 5000 + b"}"))  # past Python's int-digit limit
@example(data=framed(b'{"w":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}'))
def _generated_safetensors(data: bytes) -> None:
    exercise("safetensors", data)


# --- generated ckpt records -----------------------------------------------------------------------------------------

TENSOR_TYPES = st.one_of(
    st.sampled_from(sorted(MS_TO_ST)), st.sampled_from(["Float17", "", "Complex64", "Int4"]), st.text(max_size=10)
)


@st.composite
def generated_record(draw) -> bytes:
    tag = draw(st.text(max_size=20))
    dims = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**62, 2**63 - 1])), max_size=4))
    content = draw(st.binary(max_size=64))
    declared = len(content) if draw(st.integers(0, 3)) else draw(st.integers(0, 128))
    head = record_header(tag, dims, draw(TENSOR_TYPES), declared)
    return head + content


@st.composite
def generated_ckpt(draw) -> bytes:
    body = b"".join(draw(st.lists(generated_record(), max_size=4)))
    if draw(st.booleans()):
        body += CRC_MARK + draw(st.binary(min_size=10, max_size=10))
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=128))
    return body


@FUZZ
@given(data=generated_ckpt())
@example(data=record_header("w", [0, 2**63 - 1], "Float32", 0))
@example(data=b"\x0a" + b"\xff" * 20)
def _generated_ckpt(data: bytes) -> None:
    exercise("ckpt", data)


# --- the tests ------------------------------------------------------------------------------------------------------


class FuzzSummary:
    """Terminal-summary plugin: the malformed-input counts appear in the test output without ``-s``."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for kind, counts in STATS.items():
            if counts["tried"]:
                terminalreporter.write_line(
                    f"fuzz {kind}: {counts['tried']} inputs tried, {counts['malformed']} malformed "
                    f"(raised SdxlCkptError), {counts['parsed']} parsed; no other exception, no hang"
                )


@pytest.fixture(scope="module", autouse=True)
def work_dir(request, tmp_path_factory):
    """Where inputs are written; also registers the terminal summary once per session."""
    global WORK
    WORK = tmp_path_factory.mktemp("fuzz")
    if not request.config.pluginmanager.has_plugin("sdxl-ckpt-fuzz-summary"):
        request.config.pluginmanager.register(FuzzSummary(), "sdxl-ckpt-fuzz-summary")
    yield WORK


def _report(kind: str, before: Counter, record_property) -> None:
    tried = STATS[kind]["tried"] - before["tried"]
    malformed = STATS[kind]["malformed"] - before["malformed"]
    record_property(f"{kind}_inputs_tried", tried)
    record_property(f"{kind}_malformed_inputs", malformed)
    print(f"\nfuzz {kind}: {tried} inputs, {malformed} malformed, {tried - malformed} parsed")
    assert malformed > 0, "the fuzzer must actually reach the error paths"


def test_seed_files_parse(seed_safetensors, seed_ckpt):
    assert exercise("safetensors", seed_safetensors) == "parsed"
    assert exercise("ckpt", seed_ckpt) == "parsed"


def test_fuzz_safetensors_mutated(seed_safetensors, record_property):
    before = Counter(STATS["safetensors"])
    _mutated_safetensors(seed_safetensors)
    _report("safetensors", before, record_property)


def test_fuzz_safetensors_generated(record_property):
    before = Counter(STATS["safetensors"])
    _generated_safetensors()
    _report("safetensors", before, record_property)


def test_fuzz_ckpt_mutated(seed_ckpt, record_property):
    before = Counter(STATS["ckpt"])
    _mutated_ckpt(seed_ckpt)
    _report("ckpt", before, record_property)


def test_fuzz_ckpt_generated(record_property):
    before = Counter(STATS["ckpt"])
    _generated_ckpt()
    _report("ckpt", before, record_property)


def test_hang_guard_fires():
    """The guard itself works: a reader stuck in a loop is stopped and reported, not waited for."""
    with pytest.raises(ReaderHang), hang_guard(0.2):
        while True:
            pass
