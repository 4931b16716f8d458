"""Stage: a self-contained HTML dashboard of an SAE's most frequent latents.

``python -m saeflow.analysis.dashboard --features analysis/S/features.jsonl.gz
--summary analysis/S/summary.json --metrics sae_eval/S/C.metrics.json --n 24
--out plots/dashboards/S/index.html``

The page inlines the viewer's stylesheet and card renderer (``saeflow/viewer/static``) and the
feature documents, so it opens from a file:// URL with no requests at all.
"""

from __future__ import annotations

import argparse
import heapq
import html
import json
from collections.abc import Sequence
from pathlib import Path

from saeflow import h5io
from saeflow.analysis.store import read_documents

STATIC = Path(__file__).resolve().parent.parent / "viewer" / "static"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{css}</style></head>
<body><header><b>{title}</b><span id="nav"></span></header>
<main><div class="card" id="overview"></div><div id="feature"></div></main>
<script>{js}</script>
<script id="data" type="application/json">{data}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
let pos = 0;
function show(p) {{
  pos = (p + DATA.features.length) % DATA.features.length;
  const doc = DATA.features[pos];
  SF.renderFeature(document.getElementById("feature"), DATA.sae, doc, (i) => {{
    const j = DATA.features.findIndex((f) => f.index === i); if (j >= 0) show(j); }});
}}
const ov = document.getElementById("overview");
ov.appendChild(SF.el("h3", {{ text: `${{DATA.sae}}: ${{DATA.summary.d_sae}} latents on ${{DATA.summary.n_tokens}} tokens` }}));
ov.appendChild(SF.el("div", {{ class: "stats" }}, Object.entries(DATA.metrics).filter(([k, v]) =>
  typeof v === "number").map(([k, v]) => SF.el("span", {{ text: `${{k}} ${{SF.fmt(v)}}` }}))));
ov.appendChild(SF.el("div", {{ class: "latent-list" }}, ["Latents (← → to move): ",
  ...DATA.features.map((f, j) => SF.el("a", {{ href: "#", text: `#${{f.index}}`,
    onclick: (e) => {{ e.preventDefault(); show(j); }} }}))]));
SF.keyNav((d) => show(pos + d), null);
show(0);
</script></body></html>
"""


def top_documents(path: str, n: int) -> list[dict]:
    """The ``n`` most frequently firing latents' documents, most frequent first (streamed)."""
    best = heapq.nsmallest(n, ((-d["count"], d["index"], d) for d in read_documents(path)
                               if d["count"] > 0), key=lambda t: (t[0], t[1]))
    return [d for _, _, d in best]


def render(summary: dict, metrics: dict, docs: list[dict]) -> str:
    data = json.dumps({"sae": summary["sae_id"], "summary": summary, "metrics": metrics,
                       "features": docs}, ensure_ascii=False)
    # JSON inside a <script> element: only "</" can end it early
    data = data.replace("</", "<\\/")
    return PAGE.format(title=html.escape(f"saeflow dashboard: {summary['sae_id']}"),
                       css=(STATIC / "style.css").read_text(), js=(STATIC / "card.js").read_text(),
                       data=data)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.analysis.dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="analysis/{sae}/features.jsonl.gz")
    p.add_argument("--summary", required=True, help="analysis/{sae}/summary.json")
    p.add_argument("--metrics", required=True, help="sae_eval/{sae}/{corpus}.metrics.json")
    p.add_argument("--n", type=int, default=24, help="latents shown")
    p.add_argument("--out", required=True, help="index.html")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    summary = json.loads(Path(args.summary).read_text())
    metrics = json.loads(Path(args.metrics).read_text())
    page = render(summary, metrics, top_documents(args.features, args.n))
    with h5io.atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")


if __name__ == "__main__":
    main()
