"""`make eval-retrieval`: does retrieval find documents of the right category for Korean queries?

Runs every query of bench/retrieval_queries.json (72 chat messages written for this evaluation,
independently of the documents, 9 per category, each with the categories a good hit may carry)
against the configured knowledge index three ways: dense vectors only, sparse vectors only, and the
hybrid query the service uses (both fused by RRF). Reports per way, side by side:
- hit@3: the share of queries where one of the top 3 hits has an expected category;
- recall@3: the share of a query's expected categories found among the top 3 hits' categories,
  averaged over queries (category-level relevance: any document of an expected category counts);
- MRR@3: the mean reciprocal rank of the first hit of an expected category (0 when none in the top 3).
Exits non-zero when hybrid hit@3 is under 0.9. Writes bench/results/retrieval.json and
bench/results/retrieval.md (the README's table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leafresh.settings")

import django  # noqa: E402

django.setup()

from chatbot.knowledge.indexing import knowledge_search  # noqa: E402

K = 3
TARGET_HIT_AT_K = 0.9
MODES = ("dense", "sparse", "hybrid")


def evaluate(queries: list[dict], mode: str) -> dict[str, float]:
    """hit@K, recall@K and MRR@K of one retrieval mode over the queries."""
    hits = recall = mrr = 0.0
    misses: list[str] = []
    for query in queries:
        expected = set(query["categories"])
        found = [hit.category for hit in knowledge_search(query["query"], k=K, mode=mode)]
        ranks = [rank for rank, category in enumerate(found, start=1) if category in expected]
        hits += bool(ranks)
        recall += len(expected & set(found)) / len(expected)
        mrr += 1 / ranks[0] if ranks else 0.0
        if not ranks:
            misses.append(f"{query['query']} -> expected {sorted(expected)}, got {found}")
    n = len(queries)
    return {"hit_at_3": round(hits / n, 3), "recall_at_3": round(recall / n, 3), "mrr_at_3": round(mrr / n, 3), "misses": misses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", default=str(ROOT / "bench" / "retrieval_queries.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--show-misses", action="store_true", help="print the hybrid misses")
    args = parser.parse_args()
    queries = json.loads(Path(args.queries).read_text(encoding="utf-8"))
    started = time.monotonic()
    results = {mode: evaluate(queries, mode) for mode in MODES}
    lines = [
        f"Retrieval over {len(queries)} queries, top {K} hits (`make eval-retrieval`):",
        "",
        "| | dense only | sparse only | hybrid (RRF) |",
        "| --- | --- | --- | --- |",
    ]
    for metric, name in (("hit_at_3", "hit@3"), ("recall_at_3", "recall@3"), ("mrr_at_3", "MRR@3")):
        lines.append(f"| {name} | " + " | ".join(f"{results[m][metric]:.3f}" for m in MODES) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"\n({time.monotonic() - started:.1f} s; target: hybrid hit@3 >= {TARGET_HIT_AT_K})")
    if args.show_misses:
        print("\nhybrid misses:\n" + "\n".join(results["hybrid"]["misses"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps({"k": K, "queries": len(queries), **results}, ensure_ascii=False, indent=1))
    (out / "retrieval.md").write_text(table + "\n")
    if results["hybrid"]["hit_at_3"] < TARGET_HIT_AT_K:
        print(f"hybrid hit@3 {results['hybrid']['hit_at_3']} is under the target {TARGET_HIT_AT_K}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
