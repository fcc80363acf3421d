#!/usr/bin/env python3
"""Summarise what experts of a `monet index` database respond to.

    python3 scripts/expert_report.py INDEX.db [--group 0] [--experts 8] [--min-count 20]

For each router group: how many of the E^2 experts fired at all, and for the
experts whose top activations are most concentrated on few token strings (a
sign of specialisation), the most common tokens among their top-K
activations with one example context. Markdown output (for model cards).
"""
import argparse
import collections
import json
import sqlite3


def example(context_json, focus, width=6):
    """The firing token in bold with a few tokens either side."""
    toks = json.loads(context_json)
    lo, hi = max(0, focus - width), min(len(toks), focus + 3)
    text = "".join(toks[lo:focus]) + "**" + toks[focus].strip() + "**" + "".join(toks[focus + 1:hi])
    return " ".join(text.split())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("db")
    ap.add_argument("--group", type=int, action="append", help="router group(s) (default: all)")
    ap.add_argument("--experts", type=int, default=8, help="experts listed per group")
    ap.add_argument("--min-count", type=int, default=20, help="only experts active on at least this many tokens")
    a = ap.parse_args()
    db = sqlite3.connect(f"file:{a.db}?mode=ro", uri=True)
    meta = dict(db.execute("SELECT key, value FROM meta"))
    groups = a.group or [g for (g,) in db.execute("SELECT DISTINCT grp FROM experts ORDER BY grp")]
    total_tokens = sum(t for (t,) in db.execute("SELECT tokens FROM documents"))
    print(f"Index `{a.db}`: {total_tokens} tokens; meta: "
          + ", ".join(f"{k}={v}" for k, v in sorted(meta.items()) if k in ("experts", "top_k", "context")))
    for g in groups:
        n_active = db.execute("SELECT COUNT(*) FROM experts WHERE grp=? AND count>0", (g,)).fetchone()[0]
        print(f"\n### Router group {g}: {n_active} experts active\n")
        print("| expert | tokens active | top tokens among its strongest activations | example |")
        print("|---:|---:|---|---|")
        scored = []
        for expert, count in db.execute("SELECT expert, count FROM experts WHERE grp=? AND count>=?", (g, a.min_count)):
            rows = db.execute("SELECT token, context, focus, prob FROM activations WHERE grp=? AND expert=? ORDER BY prob DESC",
                              (g, expert)).fetchall()
            if len(rows) < 8:
                continue
            tokens = collections.Counter(r[0].strip().lower() for r in rows)
            top_share = sum(c for _, c in tokens.most_common(3)) / len(rows)
            scored.append((top_share, count, expert, tokens, example(rows[0][1], rows[0][2])))
        scored.sort(key=lambda s: (-s[0], -s[1]))
        shown, seen = 0, set()
        for top_share, count, expert, tokens, context in scored:
            if shown == a.experts:
                break
            if tokens.most_common(1)[0][0] in seen:  # one expert per dominant token: show variety
                continue
            seen.add(tokens.most_common(1)[0][0])
            shown += 1
            toks = ", ".join(f"`{t or '␣'}` ×{c}" for t, c in tokens.most_common(4))
            ctx = context.replace("|", "\\|")
            print(f"| {expert} | {count} | {toks} | {ctx} |")


if __name__ == "__main__":
    main()
