"""Make ``registry-v0001.db``: a registry at schema revision 0001 (before tags and evaluations) with a few
rows, kept as a fixture so tests can check that a newer patchlab upgrades an old registry and keeps its rows.

Run from the repository root: ``PYTHONPATH=. python tests/data/make_registry_v0001.py``.
The committed file was made by this script; rerunning it rewrites the file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import text

from registry.db import Database, resolve_location, upgrade_schema

OUT = Path(__file__).resolve().parent / "registry-v0001.db"
D1 = "1" * 64
D2 = "2" * 64
C1 = "a1" * 32
C2 = "b2" * 32


def main() -> None:
    OUT.unlink(missing_ok=True)
    db = Database(resolve_location(OUT))
    upgrade_schema(db, "0001")
    now = "2026-01-01 00:00:00.000000"
    with db.engine.execution_options(write_lock=True).begin() as c:
        c.execute(text("INSERT INTO families (id, name, created_at) VALUES (1, 'llama', :t)"), {"t": now})
        for i, (ver, content) in enumerate([("v1", C1), ("v2", C2)], start=1):
            c.execute(
                text(
                    "INSERT INTO base_versions (id, family_id, version, source_kind, source, architecture,"
                    " content, num_parameters, dtype, vocab_size, release_order, created_at) VALUES"
                    " (:id, 1, :v, 'local', :src, :arch, :content, 1234, 'float32', 16, :id, :t)"
                ),
                {
                    "id": i,
                    "v": ver,
                    "src": f"/models/llama-{ver}",
                    "arch": "c" * 64,
                    "content": content,
                    "t": now,
                },
            )
        for pid, ver, digest, base in [(1, 1, D1, 1), (2, 2, D2, 2)]:
            c.execute(
                text(
                    "INSERT INTO patches (id, name, version, digest, size, base_version_id, base_content,"
                    " finetuned, encoding, method, parameters, num_tensors, format_version, totals, stats,"
                    " created_at) VALUES (:id, 'sql', :ver, :dg, 100, :b, :bc, '/models/ft', 'dense', 'diff',"
                    " '{\"alpha\": 1}', 1, '1', '{}', '{}', :t)"
                ),
                {"id": pid, "ver": ver, "dg": digest, "b": base, "bc": C1 if base == 1 else C2, "t": now},
            )
            c.execute(
                text("INSERT INTO patch_files (patch_id, name, digest, size) VALUES (:p, 'patch.json', :d, 100)"),
                {"p": pid, "d": "f" * 63 + str(pid)},
            )
        c.execute(text("INSERT INTO patch_parents VALUES (2, 1, 'port', 0)"))
        c.execute(
            text(
                "INSERT INTO aliases (id, name, scope_kind, scope, patch_id, updated_at)"
                " VALUES (1, 'prod', 'patch', 'sql', 2, :t)"
            ),
            {"t": now},
        )
        c.execute(
            text(
                "INSERT INTO derived_models (id, patch_id, base_version_id, kind, path, parameters,"
                " created_at) VALUES (1, 2, 2, 'apply', '/out/sql-v2', '{}', :t)"
            ),
            {"t": now},
        )
    db.dispose()
    con = sqlite3.connect(OUT)  # one self-contained file: fold the WAL back in
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
