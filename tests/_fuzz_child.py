"""Child process of tests/test_fuzz.py: damages copies of a store and reads each with every call.

Usage: ``python _fuzz_child.py STORE WORKDIR SEED FIRST COUNT``. Builds the seeded list of cases
(single-byte flips and truncations in the first data file's footer, page headers, level bytes,
values and metadata pages), runs cases FIRST..FIRST+COUNT-1 and prints one JSON line per
(case, call): ``{"case", "region", "call", "outcome"}`` where outcome is ``ok`` (the result equals the
undamaged store's, checked against a NumPy float64 reference), ``wrong`` (it does not),
``EmbtoolsError subclass name``, ``hang`` (past the per-case alarm) or ``foreign:<type>``.
A line ``{"start": case}`` precedes each case, so a signal that kills the process is attributed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

import embtools as et
from embtools.errors import EmbtoolsError
from embtools.storage.footer import parse_footer
from embtools.storage.thrift import parse_page_header

D = 8
CASE_SECONDS = 20


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def regions(path: Path) -> dict[str, list[int]]:
    """Byte offsets of the first data file by kind."""
    raw = path.read_bytes()
    footer = parse_footer(raw)
    out: dict[str, list[int]] = {"footer": list(range(footer.data_end, len(raw) - 8)),
                                 "page_header": [], "levels": [], "values": [], "metadata_page": []}
    for _, chunks in footer.row_groups:
        for c in chunks:
            pos, end = c.start, c.start + c.length
            while pos < end:
                h = parse_page_header(raw[pos:pos + 65536])
                body = pos + h.header_size
                out["page_header"].extend(range(pos, body))
                body_end = body + h.compressed_page_size
                if c.name.startswith("emb_"):
                    v2 = h.data_page_header_v2
                    assert v2 is not None
                    lv = body + v2.repetition_levels_byte_length + v2.definition_levels_byte_length
                    out["levels"].extend(range(body, lv))
                    out["values"].extend(range(lv, body_end))
                else:
                    out["metadata_page"].extend(range(body, body_end))
                pos = body_end
    return out


def cases(path: Path, seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    reg = regions(path)
    size = path.stat().st_size
    kinds = ["footer", "page_header", "levels", "values", "metadata_page"]
    out = []
    for i in range(n):
        if i % 10 == 9:  # one case in ten: a truncation
            out.append({"region": "truncate", "at": rng.randrange(0, size)})
        else:
            region = kinds[i % len(kinds)]
            out.append({"region": region, "at": rng.choice(reg[region]),
                        "mask": 1 << rng.randrange(8)})
    return out


def damage(path: Path, case: dict) -> None:
    raw = bytearray(path.read_bytes())
    if case["region"] == "truncate":
        del raw[case["at"]:]
    else:
        raw[case["at"]] ^= case["mask"]
    path.write_bytes(bytes(raw))


def reference(store: Path) -> dict:
    s = et.EmbeddingStore(store, backend="numpy")
    x = np.asarray(s.get_embeddings(D), dtype=np.float64)
    meta = s.metadata().collect()
    years = meta["year"].to_numpy()
    q = x[[3, 50]]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    top = np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :3]
    return {"x": x.astype(np.float32), "meta": meta, "years": years, "q": q.astype(np.float32),
            "top": meta["row_id"].to_numpy()[top]}


def calls(ref: dict) -> dict:
    def get(s):
        return np.array_equal(np.asarray(s.get_embeddings(D)), ref["x"])

    def where(s):
        return np.array_equal(np.asarray(s.get_embeddings(D, where="year > 2010")),
                              ref["x"][ref["years"] > 2010])

    def search(s):
        r = s.search(ref["q"], k=3)
        return np.array_equal(r["row_id"].to_numpy().reshape(2, 3), ref["top"])

    def metadata(s):
        return s.metadata().collect().equals(ref["meta"])

    def delete(s):
        s.delete("year < 2003")
        again = et.EmbeddingStore(s.path, backend="numpy")
        keep = ref["years"] >= 2003
        return (np.array_equal(np.asarray(again.get_embeddings(D)), ref["x"][keep])
                and again.metadata().collect().equals(ref["meta"].filter(ref["meta"]["year"] >= 2003)))

    def compact(s):
        s.compact(target_file_bytes=10**9)
        again = et.EmbeddingStore(s.path, backend="numpy")
        return (np.array_equal(np.asarray(again.get_embeddings(D)), ref["x"])
                and again.metadata().collect().equals(ref["meta"]))

    return {"get": get, "where": where, "search": search, "metadata": metadata, "delete": delete,
            "compact": compact}


def main() -> None:
    store, work, seed, first, count = (Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]),
                                       int(sys.argv[4]), int(sys.argv[5]))
    manifest = json.loads(sorted((store / "_versions").glob("*.json"))[-1].read_text())
    rel = manifest["files"][0]["path"]
    ref = reference(store)
    todo = cases(store / rel, seed, first + count)[first:]
    signal.signal(signal.SIGALRM, _alarm)
    for i, case in enumerate(todo, start=first):
        print(json.dumps({"start": i}), flush=True)
        for name, fn in calls(ref).items():
            copy = work / f"c{i}-{name}"
            shutil.copytree(store, copy)
            damage(copy / rel, case)
            signal.alarm(CASE_SECONDS)
            try:
                outcome = "ok" if fn(et.EmbeddingStore(copy, backend="numpy")) else "wrong"
            except EmbtoolsError as exc:
                outcome = type(exc).__name__
            except Hang:
                outcome = "hang"
            except BaseException as exc:
                outcome = f"foreign:{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                signal.alarm(0)
            shutil.rmtree(copy, ignore_errors=True)
            print(json.dumps({"case": i, "region": case["region"], "call": name,
                              "outcome": outcome}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    main()
