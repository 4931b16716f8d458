"""The feature database: one interface, two back-ends (embedded SQLite, PostgreSQL server).

``python -m saeflow.analysis.store load --db results/features.sqlite --sae-id S
--features analysis/S/features.jsonl.gz --summary analysis/S/summary.json
--metrics sae_eval/S/C.metrics.json [--autointerp autointerp/S/results.jsonl] --stamp loaded.json``

``--db`` is a SQLite file path (or ``sqlite:///path``) or a ``postgresql://`` URL.

Tables (the OpenMOSS MongoDB collections ``saes``, ``features``, ``bookmarks`` as relations; a
feature's analysis is one JSON document, JSONB on PostgreSQL):

``saes(name, summary, metrics, version, loaded_at)``
``features(sae, idx, freq, max, doc)``                  primary key (sae, idx)
``interpretations(sae, idx, source, text, score, updated)``   source 'autointerp' or 'user'
``bookmarks(sae, idx, note, created)``
``layer_examples(sae, idx, layer, rank, act, token_id, token, token_ids, tokens, acts)``
    primary key (sae, idx, layer, rank): max-activating examples per (latent, layer) of a
    multi-layer SAE (:mod:`saeflow.mlsae.examples`), the original mlsae ``examples`` table with
    ``sae`` added; replaced per SAE in one transaction by :meth:`FeatureStore.load_layer_examples`
    together with its row of ``mlsaes(name, summary, loaded_at)`` (layers, d_sae, model and
    MLSAE paths, for the viewer's prompt views)

A load replaces the SAE's ``saes`` row, its ``features`` and its auto-interp interpretations in
one transaction, so readers see the old version until the commit and a killed load leaves it
intact; user interpretations and bookmarks are kept across loads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saeflow import h5io

log = logging.getLogger("saeflow.analysis.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS saes (name TEXT PRIMARY KEY, summary {json} NOT NULL,
    metrics {json}, version TEXT NOT NULL, loaded_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (sae TEXT NOT NULL, idx INTEGER NOT NULL,
    freq DOUBLE PRECISION NOT NULL, max DOUBLE PRECISION NOT NULL, doc {json} NOT NULL,
    PRIMARY KEY (sae, idx));
CREATE INDEX IF NOT EXISTS features_freq ON features (sae, freq);
CREATE TABLE IF NOT EXISTS interpretations (sae TEXT NOT NULL, idx INTEGER NOT NULL,
    source TEXT NOT NULL, text TEXT NOT NULL, score {json}, updated TEXT NOT NULL,
    PRIMARY KEY (sae, idx, source));
CREATE TABLE IF NOT EXISTS bookmarks (sae TEXT NOT NULL, idx INTEGER NOT NULL, note TEXT,
    created TEXT NOT NULL, PRIMARY KEY (sae, idx));
CREATE TABLE IF NOT EXISTS layer_examples (sae TEXT NOT NULL, idx INTEGER NOT NULL,
    layer INTEGER NOT NULL, rank INTEGER NOT NULL, act DOUBLE PRECISION NOT NULL,
    token_id INTEGER NOT NULL, token TEXT NOT NULL, token_ids {json} NOT NULL,
    tokens {json} NOT NULL, acts {json} NOT NULL, PRIMARY KEY (sae, idx, layer, rank));
CREATE TABLE IF NOT EXISTS mlsaes (name TEXT PRIMARY KEY, summary {json} NOT NULL,
    loaded_at TEXT NOT NULL);
"""

LAYER_EXAMPLE_COLUMNS = ("idx", "layer", "rank", "act", "token_id", "token", "token_ids",
                         "tokens", "acts")
"""Columns of ``layer_examples`` after ``sae``; the last three are JSON lists."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json(value: Any) -> Any:
    """JSON columns come back parsed from PostgreSQL (JSONB) and as text from SQLite."""
    return json.loads(value) if isinstance(value, str | bytes) else value


class FeatureStore:
    """Queries shared by both back-ends; subclasses supply the connection and placeholders."""

    json_type = "TEXT"

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._script(SCHEMA.format(json=self.json_type))

    # -- back-end specifics ------------------------------------------------------------------
    def _sql(self, query: str) -> str:
        return query

    def _script(self, script: str) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.cursor()
        cur.execute(self._sql(query), tuple(params))
        return list(cur.fetchall())

    def _exec(self, query: str, params: Sequence[Any] = (), commit: bool = True) -> None:
        self.conn.cursor().execute(self._sql(query), tuple(params))
        if commit:
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    # -- loading -----------------------------------------------------------------------------
    def load(self, summary: dict, docs: Iterable[dict], metrics: dict | None,
             interpretations: Iterable[tuple[int, str, dict]] = (), batch_rows: int = 500,
             progress: Any = None) -> int:
        """Replace one SAE in one transaction; return the number of features loaded."""
        name, n = summary["sae_id"], 0
        self._begin()
        try:
            cur = self.conn.cursor()
            for table in ("features", "saes"):
                cur.execute(self._sql(f"DELETE FROM {table} WHERE {'sae' if table == 'features' else 'name'} = ?"), (name,))
            cur.execute(self._sql("DELETE FROM interpretations WHERE sae = ? AND source = ?"),
                        (name, "autointerp"))
            insert = self._sql("INSERT INTO features (sae, idx, freq, max, doc) VALUES (?, ?, ?, ?, ?)")
            for batch in _batches(docs, batch_rows):
                cur.executemany(insert, [(name, d["index"], d["freq"], d["max"],
                                          json.dumps(d, ensure_ascii=False)) for d in batch])
                n += len(batch)
                if progress is not None:
                    progress(n)
            cur.executemany(self._sql(
                "INSERT INTO interpretations (sae, idx, source, text, score, updated)"
                " VALUES (?, ?, 'autointerp', ?, ?, ?)"),
                [(name, i, text, json.dumps(score), _now()) for i, text, score in interpretations])
            cur.execute(self._sql("INSERT INTO saes (name, summary, metrics, version, loaded_at)"
                                  " VALUES (?, ?, ?, ?, ?)"),
                        (name, json.dumps(summary), json.dumps(metrics), summary.get("version", ""),
                         _now()))
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return n

    def load_layer_examples(self, sae: str, rows: Iterable[dict], summary: dict | None = None,
                            batch_rows: int = 2000) -> int:
        """Replace one SAE's per-(latent, layer) examples (and its ``mlsaes`` row, when
        ``summary`` is given) in one transaction; return the number of examples."""
        n = 0
        self._begin()
        try:
            cur = self.conn.cursor()
            cur.execute(self._sql("DELETE FROM layer_examples WHERE sae = ?"), (sae,))
            if summary is not None:
                cur.execute(self._sql("DELETE FROM mlsaes WHERE name = ?"), (sae,))
                cur.execute(self._sql("INSERT INTO mlsaes (name, summary, loaded_at)"
                                      " VALUES (?, ?, ?)"), (sae, json.dumps(summary), _now()))
            insert = self._sql(f"INSERT INTO layer_examples (sae, {', '.join(LAYER_EXAMPLE_COLUMNS)})"
                               f" VALUES (?{', ?' * len(LAYER_EXAMPLE_COLUMNS)})")
            for batch in _batches(rows, batch_rows):
                cur.executemany(insert, [
                    (sae, int(r["idx"]), int(r["layer"]), int(r["rank"]), float(r["act"]),
                     int(r["token_id"]), r["token"], json.dumps(r["token_ids"]),
                     json.dumps(r["tokens"], ensure_ascii=False), json.dumps(r["acts"]))
                    for r in batch])
                n += len(batch)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return n

    def mlsaes(self) -> list[dict]:
        rows = self._rows("SELECT name, summary, loaded_at FROM mlsaes ORDER BY name")
        return [{"name": r[0], "summary": _json(r[1]), "loaded_at": r[2]} for r in rows]

    def mlsae(self, name: str) -> dict | None:
        return next((s for s in self.mlsaes() if s["name"] == name), None)

    def layer_examples(self, sae: str, idx: int, layer: int | None = None) -> list[dict]:
        """A latent's examples, by layer then rank (one layer if ``layer`` is given)."""
        query = (f"SELECT {', '.join(LAYER_EXAMPLE_COLUMNS)} FROM layer_examples"
                 " WHERE sae = ? AND idx = ?")
        params: list[Any] = [sae, idx]
        if layer is not None:
            query += " AND layer = ?"
            params.append(layer)
        rows = self._rows(query + " ORDER BY layer, rank", params)
        out = []
        for r in rows:
            row = dict(zip(LAYER_EXAMPLE_COLUMNS, r, strict=True))
            for key in ("token_ids", "tokens", "acts"):
                row[key] = _json(row[key])
            out.append(row)
        return out

    # -- reading -----------------------------------------------------------------------------
    def saes(self) -> list[dict]:
        rows = self._rows("SELECT name, summary, metrics, version, loaded_at FROM saes ORDER BY name")
        return [{"name": r[0], "summary": _json(r[1]), "metrics": _json(r[2]), "version": r[3],
                 "loaded_at": r[4]} for r in rows]

    def sae(self, name: str) -> dict | None:
        return next((s for s in self.saes() if s["name"] == name), None)

    def feature_count(self, sae: str) -> int:
        return int(self._rows("SELECT COUNT(*) FROM features WHERE sae = ?", (sae,))[0][0])

    def feature(self, sae: str, idx: int) -> dict | None:
        rows = self._rows("SELECT doc FROM features WHERE sae = ? AND idx = ?", (sae, idx))
        if not rows:
            return None
        doc = _json(rows[0][0])
        doc["interpretations"] = self.interpretations(sae, idx)
        doc["bookmarked"] = bool(self._rows("SELECT 1 FROM bookmarks WHERE sae = ? AND idx = ?",
                                            (sae, idx)))
        return doc

    def feature_indices(self, sae: str, min_freq: float = 0.0, max_freq: float = 1.0) -> list[int]:
        rows = self._rows("SELECT idx FROM features WHERE sae = ? AND freq >= ? AND freq <= ?"
                          " ORDER BY idx", (sae, min_freq, max_freq))
        return [int(r[0]) for r in rows]

    def frequencies(self, sae: str) -> list[tuple[int, float, float]]:
        rows = self._rows("SELECT idx, freq, max FROM features WHERE sae = ? ORDER BY idx", (sae,))
        return [(int(a), float(b), float(c)) for a, b, c in rows]

    def interpretations(self, sae: str, idx: int) -> list[dict]:
        rows = self._rows("SELECT source, text, score, updated FROM interpretations"
                          " WHERE sae = ? AND idx = ? ORDER BY source DESC", (sae, idx))
        return [{"source": r[0], "text": r[1], "score": _json(r[2]), "updated": r[3]}
                for r in rows]

    def put_interpretation(self, sae: str, idx: int, text: str, score: dict | None) -> None:
        self._exec("INSERT INTO interpretations (sae, idx, source, text, score, updated)"
                   " VALUES (?, ?, 'user', ?, ?, ?) ON CONFLICT (sae, idx, source)"
                   " DO UPDATE SET text = excluded.text, score = excluded.score,"
                   " updated = excluded.updated", (sae, idx, text, json.dumps(score), _now()))

    def add_bookmark(self, sae: str, idx: int, note: str) -> None:
        self._exec("INSERT INTO bookmarks (sae, idx, note, created) VALUES (?, ?, ?, ?)"
                   " ON CONFLICT (sae, idx) DO UPDATE SET note = excluded.note",
                   (sae, idx, note, _now()))

    def delete_bookmark(self, sae: str, idx: int) -> bool:
        found = bool(self._rows("SELECT 1 FROM bookmarks WHERE sae = ? AND idx = ?", (sae, idx)))
        self._exec("DELETE FROM bookmarks WHERE sae = ? AND idx = ?", (sae, idx))
        return found

    def bookmarks(self) -> list[dict]:
        rows = self._rows("SELECT sae, idx, note, created FROM bookmarks ORDER BY created, sae, idx")
        return [{"sae": r[0], "index": r[1], "note": r[2], "created": r[3]} for r in rows]


class SQLiteStore(FeatureStore):
    """Embedded default: one file, no server. WAL lets the viewer read while a load writes."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=120, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        super().__init__(conn)

    def _script(self, script: str) -> None:
        self.conn.executescript(script)

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _exec(self, query: str, params: Sequence[Any] = (), commit: bool = True) -> None:
        self.conn.execute(query, tuple(params))  # autocommit mode outside load()


class PostgresStore(FeatureStore):
    """Server back-end (psycopg 3): JSONB documents, many readers and writers."""

    json_type = "JSONB"

    def __init__(self, url: str) -> None:
        import psycopg

        super().__init__(psycopg.connect(url))

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def _script(self, script: str) -> None:
        with self.conn.cursor() as cur:
            for statement in filter(str.strip, script.split(";")):
                cur.execute(statement)
        self.conn.commit()

    def _begin(self) -> None:
        self.conn.commit()  # psycopg opens the transaction at the first statement

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        rows = super()._rows(query, params)
        self.conn.commit()  # end the read transaction: a later read sees later loads
        return rows


def open_store(db: str) -> FeatureStore:
    """A store from ``--db``: a ``postgresql://`` URL, or a SQLite path / ``sqlite:///path``."""
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    path = db.removeprefix("sqlite:///") if db.startswith("sqlite:///") else db
    if "://" in path:
        raise ValueError(f"--db {db!r}: expected a SQLite file path, sqlite:///path or "
                         "postgresql://...")
    return SQLiteStore(path)


def _batches(items: Iterable[dict], n: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def read_documents(path: str) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def scorer_accuracy(scorer: dict) -> float | None:
    """Balanced accuracy of one auto-interp scorer (Neuronpedia's ``eleuther_fuzz`` score is
    balanced accuracy), over the answers that parsed."""
    pairs = [(lab, pred) for lab, pred in zip(scorer.get("label", []), scorer.get("prediction", []),
                                              strict=False) if pred is not None]
    pos = [p == lab for lab, p in pairs if lab == 1]
    neg = [p == lab for lab, p in pairs if lab == 0]
    rates = [sum(x) / len(x) for x in (pos, neg) if x]
    return sum(rates) / len(rates) if rates else None


def read_autointerp(path: str) -> list[tuple[int, str, dict]]:
    """(latent, explanation, scores) of the latents an auto-interp run explained."""
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("explanation"):
            score = {k: scorer_accuracy(rec[k]) for k in ("detection", "fuzzing") if rec.get(k)}
            out.append((int(rec["latent"]), rec["explanation"], score))
    return out


def load_command(args: argparse.Namespace) -> None:
    summary = json.loads(Path(args.summary).read_text())
    if summary.get("sae_id") != args.sae_id:
        raise ValueError(f"{args.summary}: sae_id {summary.get('sae_id')!r}, expected "
                         f"{args.sae_id!r}")
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    interp = read_autointerp(args.autointerp) if args.autointerp else []
    summary["version"] = args.version or f"{Path(args.features).stat().st_mtime_ns}"
    store = open_store(args.db)
    t0 = time.perf_counter()

    def progress(n: int) -> None:
        print(f"loaded {n} features", file=sys.stderr, flush=True)

    n = store.load(summary, read_documents(args.features), metrics, interp, args.batch_rows,
                   progress)
    store.close()
    seconds = time.perf_counter() - t0
    log.info("loaded %d features of %s into %s in %.2f s", n, args.sae_id, args.db, seconds)
    if args.stamp:
        h5io.write_json(args.stamp, {"sae_id": args.sae_id, "features": n,
                                     "interpretations": len(interp), "version": summary["version"],
                                     "seconds": seconds})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m saeflow.analysis.store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("load", help="load one SAE's analysis (replaces its previous version)")
    p.add_argument("--db", required=True, help="SQLite path or postgresql:// URL")
    p.add_argument("--sae-id", required=True)
    p.add_argument("--features", required=True, help="analysis/{sae}/features.jsonl.gz")
    p.add_argument("--summary", required=True, help="analysis/{sae}/summary.json")
    p.add_argument("--metrics", default="", help="sae_eval/{sae}/{corpus}.metrics.json")
    p.add_argument("--autointerp", default="", help="autointerp/{sae}/results.jsonl, if any")
    p.add_argument("--batch-rows", type=int, default=500, help="features per INSERT batch")
    p.add_argument("--version", default="", help="version label (default: features file mtime)")
    p.add_argument("--stamp", default="", help="JSON written after the commit (Snakemake output)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_command(parse_args(argv))


if __name__ == "__main__":
    main()
