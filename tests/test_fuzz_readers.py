"""Fuzz the readers: any bytes given as a safetensors file, a MindSpore ckpt, a diffusers component folder (config
and index JSON), a reference ``.npz`` or a LoRA-looking safetensors (through the file sniffer) either parse (and
then every tensor loads and hashes) or raise our own ``SdxlCkptError``; never another exception, never a hang,
and never an allocation a header merely claims (the peak RSS of the whole run is checked at the end).

Inputs are mutations of real small files (bit flips, overwrites, truncation, insertion, deletion) and generated
headers / records (valid structure with hostile values). Runs are derandomized and bounded (``max_examples``
per strategy, ``deadline``): the default run tries more than 10,000 inputs; ``SDXL_CKPT_FUZZ_EXAMPLES`` changes
the per-strategy budget. The counts are printed (``-s``), stored as test properties and shown in the terminal
summary.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import struct
import tempfile
import zipfile
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
from sdxl_ckpt.formats.diffusers_folder import read_component
from sdxl_ckpt.formats.dtypes import MS_TO_ST, ST_TO_NUMPY
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.reference_npz import FORMAT, META_KEY, REQUIRED, load_reference
from sdxl_ckpt.formats.safetensors_io import read_safetensors
from sdxl_ckpt.formats.sniff import KINDS, expect, sniff
from sdxl_ckpt.manage.hashing import hash_entries, hash_safetensors
from sdxl_ckpt.manage.inspect import inspect_checkpoint
from sdxl_ckpt.sdxl.components import partial_of

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]
EXAMPLES = int(os.environ.get("SDXL_CKPT_FUZZ_EXAMPLES", "1300"))  # per strategy; 8 strategies
MAX_RSS_GROWTH = 512 * 1024 * 1024  # a run of small inputs; a header obeyed instead of checked would blow past it
HANG_SECONDS = 10.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=3000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATS: dict[str, Counter] = {kind: Counter() for kind in ("safetensors", "ckpt", "diffusers", "npz", "sniff")}
WORK = Path(tempfile.gettempdir())  # replaced by a fresh folder for this module (fixture ``work_dir``)


START_RSS = [0]  # peak RSS (bytes) when the module's first test starts


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


def _write_input(kind: str, data: bytes | dict[str, bytes]) -> Path:
    """``data`` on disk: one file, or (diffusers) a pipeline folder with ``unet/<name>`` for each item."""
    if kind == "diffusers":
        pipe = WORK / "pipe"
        shutil.rmtree(pipe, ignore_errors=True)
        (pipe / "unet").mkdir(parents=True)
        for name, content in data.items():
            (pipe / "unet" / name).write_bytes(content)
        return pipe
    suffix = {"safetensors": ".safetensors", "sniff": ".safetensors", "npz": ".npz"}.get(kind, ".ckpt")
    path = WORK / f"input{suffix}"
    path.write_bytes(data)
    return path


def _read_every_way(kind: str, path: Path) -> None:
    if kind == "diffusers":
        component = read_component("unet", path / "unet")
        for entry in component.entries:
            entry.load()
        inspect_checkpoint(path, with_hash=True)
    elif kind == "npz":
        ref = load_reference(path)
        assert all(isinstance(v, np.ndarray) for v in ref.arrays.values())
    elif kind == "sniff":
        found = sniff(path, partial_of)
        assert found.kind in KINDS
        expect(found, ("sd",), "st-to-ms", "an SD safetensors file")


def exercise(kind: str, data: bytes | dict[str, bytes]) -> str:
    """Write ``data`` as a ``kind`` input and read it every way the tool does; 'parsed' or 'malformed'."""
    path = _write_input(kind, data)
    STATS[kind]["tried"] += 1
    try:
        with hang_guard():
            if kind in ("diffusers", "npz", "sniff"):
                _read_every_way(kind, path)
            elif kind == "safetensors":
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
            if kind in ("safetensors", "ckpt"):
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


# --- generated diffusers component folders (config.json, index json, shards) ----------------------------------------

UNET_CONFIG = json.dumps({"_class_name": "UNet2DConditionModel", "addition_time_embed_dim": 256}).encode()
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
)
SHARD_NAME = st.one_of(
    st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "", ".", "sub/a.safetensors", "a.bin"]),
    st.text(max_size=12),
    JSON_SCALAR,
)


@st.composite
def generated_component(draw, seed: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    choice = draw(st.integers(0, 3))
    if choice:
        files["config.json"] = UNET_CONFIG if choice == 1 else json.dumps(draw(JSON_VALUE)).encode()
    if choice == 3:
        files["config.json"] = draw(st.binary(max_size=64))
    weights = draw(st.integers(0, 2))
    if weights == 0:
        files["diffusion_pytorch_model.safetensors"] = mutate(seed, draw(st.lists(MUTATION, max_size=2)))
    else:
        shards = draw(st.lists(SHARD_NAME, max_size=3))
        weight_map = {draw(st.text(max_size=10)): shard for shard in shards}
        index: object = {"metadata": draw(JSON_VALUE), "weight_map": weight_map} if weights == 1 else draw(JSON_VALUE)
        files["diffusion_pytorch_model.safetensors.index.json"] = json.dumps(index).encode()
        files["a.safetensors"] = mutate(seed, draw(st.lists(MUTATION, max_size=2)))
        if draw(st.booleans()):
            files["diffusion_pytorch_model.safetensors"] = seed  # two weight formats at once
    return files


@FUZZ
@given(data=st.data())
def _generated_diffusers(seed: bytes, data) -> None:
    exercise("diffusers", data.draw(generated_component(seed)))


# --- reference .npz: mutated real files and hostile .npy headers ---------------------------------------------------


def npz_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def npy_header(shape: object, descr: object = "<f4", version: int = 1) -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("utf-8")
    size = 2 if version == 1 else 4
    pad = -(10 + size - 2 + len(text) + 1) % 64
    body = text + b" " * pad + b"\n"
    length = struct.pack("<H" if version == 1 else "<I", len(body))
    return b"\x93NUMPY" + bytes([version, 0]) + length + body


@st.composite
def generated_npz(draw) -> bytes:
    members = {}
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(st.one_of(st.tuples(), st.lists(HOSTILE_INT.filter(lambda n: n >= 0), max_size=3).map(tuple)))
        descr = draw(st.one_of(st.sampled_from(["<f4", "<i8", "|u1", "O", "<U4", "V8"]), JSON_SCALAR))
        members[draw(st.sampled_from([f"{k}.npy" for k in REQUIRED] + ["x.npy", "meta_json.npy", "x.txt"]))] = (
            npy_header(shape, descr, draw(st.sampled_from([1, 2]))) + draw(st.binary(max_size=64))
        )
    return npz_bytes(members, compress=draw(st.booleans()))


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def _mutated_npz(seed: bytes, mutations: list[tuple]) -> None:
    exercise("npz", mutate(seed, mutations))


@FUZZ
@given(data=generated_npz())
@example(data=npz_bytes({"latents.npy": npy_header((10**12,)) + b"\0" * 16}))  # claims 4 TB in a few bytes
@example(data=npz_bytes({"latents.npy": npy_header((2**40,), "<f4", 2)}, compress=True))
def _generated_npz(data: bytes) -> None:
    exercise("npz", data)


# --- LoRA-looking safetensors through the sniffer -------------------------------------------------------------------

NAME_PREFIX = st.sampled_from(
    ["lora_unet_down_blocks_0_", "lora_te1_text_model_", "lora_te_", "unet.down_blocks.0.", "text_encoder.",
     "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.1.model.", "down_blocks.0.", ""]
)  # fmt: skip
NAME_SUFFIX = st.sampled_from(
    [".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.default.weight", ".hada_w1_a",
     ".processor.to_q_lora.down.weight", ".weight", ".gamma", ".embedding_table", ""]
)  # fmt: skip


@st.composite
def lora_like(draw) -> bytes:
    header: dict = {}
    offset = 0
    for _ in range(draw(st.integers(0, 6))):
        name = draw(NAME_PREFIX) + draw(st.text("abc_0.", max_size=6)) + draw(NAME_SUFFIX)
        n = draw(st.integers(0, 4))
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    if draw(st.booleans()):
        header["__metadata__"] = draw(METADATA)
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * offset
    return mutate(data, draw(st.lists(MUTATION, max_size=1)))


@FUZZ
@given(data=lora_like())
@example(data=b"")
@example(data=b"PK\x03\x04" + b"\0" * 40)
@example(data=b"\x80\x02}q\x00.")
def _sniffed(data: bytes) -> None:
    exercise("sniff", data)


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
        total = sum(c["tried"] for c in STATS.values())
        if total:
            terminalreporter.write_line(f"fuzz total: {total} inputs tried")


@pytest.fixture(scope="module", autouse=True)
def work_dir(request, tmp_path_factory):
    """Where inputs are written; also registers the terminal summary once per session."""
    global WORK
    WORK = tmp_path_factory.mktemp("fuzz")
    START_RSS[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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


@pytest.fixture(scope="module")
def seed_npz(work_dir) -> bytes:
    arrays = {k: np.zeros((2, 2), np.float32) for k in REQUIRED}
    meta = np.array(json.dumps({"format": FORMAT, "settings": {}}))
    return npz_bytes({f"{k}.npy": _npy(v) for k, v in {**arrays, META_KEY: meta}.items()})


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_fuzz_diffusers_folders(seed_safetensors, record_property):
    before = Counter(STATS["diffusers"])
    _generated_diffusers(seed_safetensors)
    _report("diffusers", before, record_property)


def test_fuzz_npz_mutated(seed_npz, record_property):
    assert exercise("npz", seed_npz) == "parsed"
    before = Counter(STATS["npz"])
    _mutated_npz(seed_npz)
    _report("npz", before, record_property)


def test_fuzz_npz_generated(record_property):
    before = Counter(STATS["npz"])
    _generated_npz()
    _report("npz", before, record_property)


def test_fuzz_lora_through_the_sniffer(record_property):
    before = Counter(STATS["sniff"])
    _sniffed()
    _report("sniff", before, record_property)


def test_fuzz_total_and_memory(record_property):
    """Runs last: the default budget gives >= 10,000 inputs, and no input made the process allocate what it claimed."""
    total = sum(c["tried"] for c in STATS.values())
    record_property("inputs_tried_total", total)
    print(f"\nfuzz total: {total} inputs tried")
    if EXAMPLES >= 1300:
        assert total >= 10_000
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - START_RSS[0]
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB during the fuzz run"


def test_hang_guard_fires():
    """The guard itself works: a reader stuck in a loop is stopped and reported, not waited for."""
    with pytest.raises(ReaderHang), hang_guard(0.2):
        while True:
            pass
