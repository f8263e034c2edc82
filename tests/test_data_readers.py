"""Stage 1 on files as they are downloaded: compressed, with a byte order mark or CRLF line ends, bytes that are
not UTF-8, empty, cut short or unreadable."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from tasks.data import DataGateError, intake, prepare
from tasks.data.sources import SourceError, local_records
from tunewright.recipe import DataConfig
from tests.conftest import ROOT, write_jsonl
from tests.test_data_stage1 import cfg, lines, qa, reconciles, run

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}
TOLERANT = {"min_rows": 5, "max_rejected_fraction": 0.2}


def chat(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": qa(i)[0]},
                                         {"role": "assistant", "content": qa(i)[1]}]} for i in range(n)]


def kept(s: dict) -> dict[str, dict]:
    return {r["id"]: r for name in ("train", "val", "test") for r in lines(s["paths"][name])}


def cli(*args, home: Path, prefix: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEWRIGHT_HOME": str(home)}
    return subprocess.run([*prefix, sys.executable, "-m", "tunewright.cli", "data", "check", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_compressed_json_lines_read_as_the_plain_file_with_the_digest_of_the_stored_bytes(tmp_path):
    plain = write_jsonl(tmp_path / "t.jsonl", chat(30))
    want = kept(run(plain, tmp_path / "plain"))
    for suffix, compress in COMPRESS.items():
        path = tmp_path / f"t.jsonl{suffix}"
        path.write_bytes(compress(plain.read_bytes()))
        s = run(path, tmp_path / suffix)
        got = kept(s)
        assert s["rows_kept"] == 30 and reconciles(s) and got.keys() == want.keys(), suffix
        assert all(got[i]["messages"] == want[i]["messages"] for i in want)
        assert got["r3"]["where"] == f"t.jsonl{suffix} line 4"
        assert not any((tmp_path / suffix / "state" / "data-cache" / "unpacked").iterdir())  # the copy is gone
        srcs, digests = intake.read_sources(cfg(path), tmp_path / "st", logging.getLogger("test"))
        intake.release(srcs)
        assert digests == [hashlib.sha256(path.name.encode() + b"\0" + path.read_bytes()).hexdigest()]


def test_compressed_json_csv_tsv_a_folder_of_them_and_json_lines_read_here(tmp_path):
    rows = chat(12)
    flat = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in rows]
    table = "prompt,completion\r\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\r\n' for r in flat)
    files = {"a.json.gz": json.dumps({"data": rows}).encode(), "b.csv.bz2": table.encode(),
             "c.tsv.xz": table.replace(",", "\t").encode(),
             "d.jsonl.zst": "".join(json.dumps(r) + "\n" for r in rows).encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(COMPRESS[Path(name).suffix](data))
        s = run(tmp_path / name, tmp_path / name.replace(".", "-"), max_examples=100)  # read in this process
        assert s["rows_kept"] == 12 and reconciles(s), name
    folder = tmp_path / "many"
    folder.mkdir()
    shutil.copy(tmp_path / "d.jsonl.zst", folder / "d.jsonl.zst")
    (folder / "e.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in chat(20)[12:]).encode()))
    s = run(folder, tmp_path / "folder")
    assert s["rows_kept"] == 20 and {r["where"].split(" line")[0] for r in kept(s).values()} == {
        "many/d.jsonl.zst", "many/e.jsonl.gz"}
    for name, kind in (("x.gz", "'.gz'"), ("x.parquet.gz", "'.parquet.gz'")):
        (tmp_path / name).write_bytes(gzip.compress(b"{}"))
        with pytest.raises(SourceError, match=f"unknown file kind {kind} .*also compressed: .bz2, .gz, .xz, .zst"):
            list(local_records(tmp_path / name))


def hostile_jsonl(path: Path, n: int = 12) -> Path:
    """A BOM, CRLF line ends, a blank line (line 4) and one line (line 7) with a byte that is not UTF-8."""
    text = [json.dumps(r).encode() for r in chat(n)]
    text[5] = text[5].replace(b"Customer", b"Customer \xff")
    text.insert(3, b"")
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(text) + b"\r\n")
    return path


def test_json_lines_with_a_bom_crlf_and_a_blank_line_are_read_and_a_line_not_utf8_is_quarantined(tmp_path):
    path = hostile_jsonl(tmp_path / "h.jsonl")
    for max_examples in (None, 100):  # ranges the row work reads, and the stream read in this process
        s = run(path, tmp_path / str(max_examples), gate=TOLERANT, max_examples=max_examples)
        assert s["rows_in"] == 12 and s["rows_quarantined"] == 1 and s["rows_kept"] == 11 and reconciles(s)
        q = s["quarantine"][0]
        assert q["where"] == "h.jsonl line 7" and q["reasons"] == ["h.jsonl line 7: not UTF-8 text (byte 0xFF at column 65)"]
        assert "r0" in kept(s) and kept(s)["r6"]["where"] == "h.jsonl line 8"
        assert "Customer \ufffd" in lines(s["paths"]["quarantine"])[0]["raw"]


def test_csv_and_json_records_holding_bytes_not_utf8_or_a_nul_are_quarantined_by_row(tmp_path):
    rows = chat(10)
    table = b"prompt,response\n" + b"".join(
        f'"{r["messages"][0]["content"]}","{r["messages"][1]["content"]}"\n'.encode() for r in rows)
    table = table.replace(b"Customer 3 ", b"Customer 3\nthe caf\xe9 ")  # row 4: a cell over lines 5 and 6
    (tmp_path / "bad.csv").write_bytes(table)
    s = run(tmp_path / "bad.csv", tmp_path / "csv", gate=TOLERANT)
    assert s["rows_in"] == 10 and s["rows_quarantined"] == 1 and reconciles(s)
    assert s["quarantine"][0]["reasons"] == ["bad.csv row 4 (line 5): not UTF-8 text (line 6: byte 0xE9 at column 8)"]
    (tmp_path / "bad.json").write_bytes(json.dumps(rows).encode().replace(b"Customer 2 ", b"Customer 2 caf\xe9 "))
    s = run(tmp_path / "bad.json", tmp_path / "json", gate=TOLERANT)
    assert s["rows_kept"] == 9 and reconciles(s)
    assert s["quarantine"][0]["reasons"] == ["bad.json item 3: not UTF-8 text (byte 0xE9)"]
    text = "".join(json.dumps(r) + "\n" for r in rows).replace("Customer 5 ", "Customer 5 \x00", 1)
    (tmp_path / "nul.jsonl").write_bytes(text.encode())
    s = run(tmp_path / "nul.jsonl", tmp_path / "nul", gate=TOLERANT)
    assert s["rows_kept"] == 9 and s["quarantine"][0]["where"] == "nul.jsonl line 6" and reconciles(s)
    assert "not JSON (Invalid control character" in s["quarantine"][0]["reasons"][0]


def test_an_empty_source_fails_the_gate_naming_it(tmp_path):
    empty = {"e.jsonl": b"", "blank.jsonl": b"\n\r\n", "header.csv": b"prompt,response\r\n", "e.jsonl.gz": b"",
             "e.json.bz2": b"", "z.jsonl.zst": COMPRESS[".zst"](b"")}
    for name, data in empty.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataGateError, match=f"no rows in source {name} ") as err:
            run(tmp_path / name, tmp_path / name.replace(".", "-"))
        assert err.value.summary["rows_in"] == 0 and not err.value.summary["passed"]
    good = write_jsonl(tmp_path / "good.jsonl", chat(20))
    mixed = {"sources": [{"path": str(good)}, {"path": str(tmp_path / "e.jsonl")}], "gate": {"min_rows": 5}}
    with pytest.raises(DataGateError) as err:
        prepare(DataConfig.model_validate(mixed), tmp_path / "mixed", use_cache=False)
    assert err.value.summary["gate_reasons"] == [f"no rows in source e.jsonl ({tmp_path / 'e.jsonl'} holds no records)"]
    assert err.value.summary["rows_kept"] == 20 and reconciles(err.value.summary)


def test_data_check_reports_each_broken_file_by_name_and_exit_code_without_a_traceback(tmp_path):
    data = "".join(json.dumps(r) + "\n" for r in chat(4000)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(data)[:-2000])
    (tmp_path / "plain.jsonl.gz").write_bytes(data)
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    (tmp_path / "x.jsonl").mkdir()
    hostile_jsonl(tmp_path / "h.jsonl", 60)
    cases = [("cut.jsonl.gz", 2, r"cut.jsonl.gz: the compressed data ends early, after line \d+ \(a truncated"),
             ("plain.jsonl.gz", 2, r"plain.jsonl.gz: cannot decompress it as gzip \(Not a gzipped file"),
             ("x.jsonl", 2, r"x.jsonl: a folder holding no readable files"),
             ("empty.jsonl.zst", 1, r"gate: FAILED\n  - no rows in source empty.jsonl.zst"),
             ("h.jsonl", 1, r"quarantined h.jsonl line 7: not UTF-8 text \(byte 0xFF at column 65\)")]
    for name, code, message in cases:
        r = cli(str(tmp_path / name), home=tmp_path / "home")
        assert r.returncode == code and "Traceback" not in r.stdout + r.stderr, (name, r.stdout, r.stderr)
        assert re.search(message, r.stdout + r.stderr), (name, r.stdout, r.stderr)
    (tmp_path / "taken").write_text("a file where the output folder would go")
    r = cli(str(tmp_path / "h.jsonl"), "--out", str(tmp_path / "taken"), home=tmp_path / "home")
    assert r.returncode == 2 and r.stderr.endswith(f"{tmp_path / 'taken'}: File exists\n"), r.stderr
    locked = write_jsonl(tmp_path / "locked.jsonl", chat(60))
    locked.chmod(0)
    # root reads any file: the check runs without the capabilities that let it
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a file cannot be made unreadable")
    r = cli(str(locked), "--json", home=tmp_path / "home", prefix=prefix)
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == f"{locked}: cannot read it (Permission denied)"
