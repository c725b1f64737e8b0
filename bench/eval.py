"""`make eval`: are the answers well-formed, well-rendered Korean recommendations for what was asked?

Sends 200 requests through the whole stack (daphne + Redis + the Celery worker, real HTTP SSE
clients), on the configured model (the demo model by default): base-info over every category,
location and work type, and free text over every category with messages written for this
evaluation (none of them is in the demo model's training data). Every request samples with its own
seed (the engine derives it from the request id), so each (mode, category) pair is answered under
several seeds. Reports:
- `valid_close_share`: streams ending in a `close` whose payload is a schema-valid answer (a
  recommendation, three challenges with title, description, an active category and its label);
- `category_match_share` (base-info): every challenge carries the requested category;
- `json_syntax_in_deltas_share`: streams whose `challenge` deltas contain JSON syntax;
- `deltas_equal_rendering_share`: streams whose concatenated deltas equal the close payload's rendering;
- `median_answer_chars`: the rendered answer's length;
- further, informative only: the base-info recommendation naming the asked place / work type,
  free-text challenges in the category the message's keywords suggest (the prompt lists it first)
  and in the category the message was written for, and recommendations that are Korean sentences;
- three sample answers.

Writes bench/results/eval.json and bench/results/eval.md (the README's report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leafresh.settings")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402

from bench.sse import aiter_events  # noqa: E402
from chatbot import seed  # noqa: E402
from chatbot.prompts import rank_by_keywords  # noqa: E402
from inference.render import render_answer  # noqa: E402
from tests.stack import launch_stack  # noqa: E402

BASE_INFO = "/ai/chatbot/recommendation/base-info"
FREE_TEXT = "/ai/chatbot/recommendation/free-text"
LABELS = {c["code"]: c["label"] for c in seed.CATEGORIES}
JSON_SYNTAX = ('{"', '":"', '"}', '","', "[{", '"recommend"', '"challenges"', '"title"', '"description"')

# Written for this evaluation: none of these is a training message of the demo model.
EVAL_MESSAGES: dict[str, list[str]] = {
    "ZERO_WASTE": [
        "택배 상자가 집에 산더미처럼 쌓였어요",
        "카페에 갈 때마다 컵 쓰레기가 나와서 마음이 불편해요",
        "장 보고 오면 비닐봉지가 너무 많아요",
        "배달 음식을 자주 시키는데 포장 쓰레기가 걱정돼요",
        "분리배출을 제대로 하고 있는지 모르겠어요",
    ],
    "PLOGGING": [
        "주말마다 등산을 가는데 길에 쓰레기가 많이 보여요",
        "아이와 함께 공원에서 할 만한 환경 활동이 있을까요?",
        "조깅 코스에 버려진 캔이 너무 많아요",
        "바닷가 산책을 좋아해요",
        "동네를 걸으면서 뭔가 보탬이 되고 싶어요",
    ],
    "CARBON_FOOTPRINT": [
        "회사까지 차로 40분 걸려요",
        "여행 갈 때 비행기를 자주 타요",
        "자전거 출퇴근을 해 볼까 고민 중이에요",
        "대중교통을 더 잘 이용하는 방법이 궁금해요",
        "내 탄소 배출량을 줄이고 싶어요",
    ],
    "ENERGY_SAVING": [
        "여름마다 에어컨을 하루 종일 틀어요",
        "집에 안 쓰는 콘센트가 꽂혀 있는 게 많아요",
        "겨울 난방비가 걱정이에요",
        "사무실 조명이 밤늦게까지 켜져 있어요",
        "전력 사용을 줄일 수 있는 습관이 궁금해요",
    ],
    "UPCYCLING": [
        "작아진 아이 옷을 어떻게 할지 모르겠어요",
        "빈 유리병이 계속 생겨요",
        "낡은 가구를 버리기 아까워요",
        "헌옷으로 뭔가 만들어 보고 싶어요",
        "고장 난 물건을 수선해서 쓰고 싶어요",
    ],
    "MEDIA": [
        "기후 위기를 다룬 다큐를 보고 싶어요",
        "독서 모임에서 환경 책을 함께 읽고 싶어요",
        "SNS로 환경 캠페인을 알리고 싶어요",
        "친구들과 환경 영화를 보고 이야기하고 싶어요",
        "환경 문화 행사에 참여해 보고 싶어요",
    ],
    "DIGITAL_CARBON": [
        "클라우드에 사진이 수만 장 있어요",
        "동영상 스트리밍을 하루에 몇 시간씩 봐요",
        "안 읽은 메일이 수천 통이에요",
        "컴퓨터를 밤새 켜 두는 편이에요",
        "데이터를 덜 쓰는 생활이 궁금해요",
    ],
    "VEGAN": [
        "일주일에 하루는 고기 없이 먹어 보고 싶어요",
        "우유 대신 마실 만한 게 있을까요?",
        "식물성 단백질 식단이 궁금해요",
        "채소 위주로 도시락을 싸고 싶어요",
        "비건 음식을 처음 먹어 보려고 해요",
    ],
}


def workload(count: int) -> list[dict[str, Any]]:
    """`count` requests: base-info and free text alternate; categories, places, jobs and messages rotate."""
    items: list[dict[str, Any]] = []
    codes = [c["code"] for c in seed.CATEGORIES]
    for i in range(count):
        code = codes[(i // 2) % len(codes)]
        round_ = i // (2 * len(codes))
        if i % 2 == 0:
            location = seed.LOCATIONS[(round_ + i // 16) % len(seed.LOCATIONS)]
            work_type = seed.WORK_TYPES[(round_ // len(seed.LOCATIONS) + i // 64 + round_) % len(seed.WORK_TYPES)]
            params = {"location": location, "workType": work_type, "category": LABELS[code]}
            items.append({"mode": "base_info", "code": code, "params": params})
        else:
            messages = EVAL_MESSAGES[code]
            items.append({"mode": "free_text", "code": code, "params": {"message": messages[round_ % len(messages)]}})
    return items


def answer_problems(answer: Any) -> list[str]:
    """Why a close payload is not a schema-valid answer (empty: it is)."""
    if not isinstance(answer, dict) or set(answer) != {"recommend", "challenges"}:
        return ["not an answer object"]
    problems = []
    if not isinstance(answer["recommend"], str) or not answer["recommend"].strip():
        problems.append("no recommendation sentence")
    challenges = answer["challenges"]
    if not isinstance(challenges, list) or len(challenges) != 3:
        return [*problems, "not three challenges"]
    for item in challenges:
        if not isinstance(item, dict) or set(item) != {"title", "description", "category", "label"}:
            problems.append(f"challenge fields {sorted(item) if isinstance(item, dict) else item!r}")
            continue
        if not item["title"].strip() or not item["description"].strip():
            problems.append("empty title or description")
        if LABELS.get(item["category"]) != item["label"]:
            problems.append(f"category {item['category']!r} with label {item['label']!r}")
    return problems


async def _one(client: httpx.AsyncClient, index: int, item: dict[str, Any]) -> dict[str, Any]:
    path = BASE_INFO if item["mode"] == "base_info" else FREE_TEXT
    params = {"sessionId": f"eval-{index}", **item["params"]}
    text, terminal = "", None
    async with client.stream("GET", path, params=params) as response:
        async for event, data in aiter_events(response):
            if event == "challenge":
                text += data["data"]
            else:
                terminal = (event, data)
    return {**item, "text": text, "terminal": terminal}


async def _run_all(base_url: str, items: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=180, limits=limits) as client:

        async def bounded(index: int, item: dict[str, Any]) -> dict[str, Any]:
            async with semaphore:
                return await _one(client, index, item)

        return await asyncio.gather(*(bounded(i, item) for i, item in enumerate(items)))


def _is_korean_sentence(text: str) -> bool:
    """Hangul, more than one word, and sentence-final punctuation (not a bare code or title)."""
    stripped = text.strip()
    return any("가" <= ch <= "힣" for ch in stripped) and " " in stripped and stripped[-1:] in ".!?"


def _share(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


def evaluate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures from the streams' results."""
    closes = [r for r in results if r["terminal"] and r["terminal"][0] == "close"]
    valid = [r for r in closes if not answer_problems(r["terminal"][1]["data"])]
    base = [r for r in results if r["mode"] == "base_info"]
    base_valid = [r for r in valid if r["mode"] == "base_info"]
    free_valid = [r for r in valid if r["mode"] == "free_text"]
    matching = [r for r in base_valid if all(c["category"] == r["code"] for c in r["terminal"][1]["data"]["challenges"])]
    with_syntax = [r for r in results if any(s in r["text"] for s in JSON_SYNTAX)]
    rendered_equal = [r for r in closes if r["text"] == render_answer(r["terminal"][1]["data"])]
    names_place = [r for r in base_valid if r["params"]["location"] in r["terminal"][1]["data"]["recommend"]]
    names_job = [r for r in base_valid if r["params"]["workType"] in r["terminal"][1]["data"]["recommend"]]
    keyword_lists = [c["keywords"] for c in seed.CATEGORIES]
    suggested = [
        r
        for r in free_valid
        if all(
            c["category"] == seed.CATEGORIES[rank_by_keywords(r["params"]["message"], keyword_lists)[0]]["code"]
            for c in r["terminal"][1]["data"]["challenges"]
        )
    ]
    korean = [r for r in valid if _is_korean_sentence(r["terminal"][1]["data"]["recommend"])]
    intended = [r for r in free_valid if all(c["category"] == r["code"] for c in r["terminal"][1]["data"]["challenges"])]
    problems: dict[str, int] = {}
    for r in results:
        reasons = (
            answer_problems(r["terminal"][1]["data"])
            if r["terminal"] and r["terminal"][0] == "close"
            else [f"{r['terminal'][0]} {r['terminal'][1]['status']}" if r["terminal"] else "no terminal event"]
        )
        for reason in reasons:
            problems[reason] = problems.get(reason, 0) + 1
    return {
        "requests": len(results),
        "base_info": len(base),
        "free_text": len(results) - len(base),
        "valid_close_share": _share(len(valid), len(results)),
        "category_match_share": _share(len(matching), len(base)),
        "json_syntax_in_deltas_share": _share(len(with_syntax), len(results)),
        "deltas_equal_rendering_share": _share(len(rendered_equal), len(closes)),
        "median_answer_chars": statistics.median(len(r["text"]) for r in results) if results else 0,
        "base_info_names_location_share": _share(len(names_place), len(base_valid)),
        "base_info_names_work_type_share": _share(len(names_job), len(base_valid)),
        "free_text_in_suggested_category_share": _share(len(suggested), len(free_valid)),
        "free_text_in_intended_category_share": _share(len(intended), len(free_valid)),
        "korean_recommendation_share": _share(len(korean), len(valid)),
        "problems": problems,
    }


def samples(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three answers to show: the first base-info, the first free-text, and one from the middle."""
    picks = [
        next(r for r in results if r["mode"] == "base_info"),
        next(r for r in results if r["mode"] == "free_text"),
        results[len(results) // 2 + 3],
    ]
    return [{"mode": r["mode"], "request": r["params"], "text": r["text"]} for r in picks]


def markdown(report: dict[str, Any], sample_answers: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report as the README shows it."""
    rows = [
        ("streams ending in a schema-valid `close`", f"{report['valid_close_share']:.1%}", "100%"),
        ("base-info challenges in the requested category", f"{report['category_match_share']:.1%}", "100%"),
        ("streams with JSON syntax in the deltas", f"{report['json_syntax_in_deltas_share']:.1%}", "0%"),
        ("deltas equal to the close payload's rendering", f"{report['deltas_equal_rendering_share']:.1%}", ""),
        ("median answer length (characters)", f"{report['median_answer_chars']:.0f}", ""),
        ("base-info recommendation names the place", f"{report['base_info_names_location_share']:.1%}", ""),
        ("base-info recommendation names the work type", f"{report['base_info_names_work_type_share']:.1%}", ""),
        ("free-text challenges in the keyword-suggested category", f"{report['free_text_in_suggested_category_share']:.1%}", ""),
        (
            "free-text challenges in the category the message was written for",
            f"{report['free_text_in_intended_category_share']:.1%}",
            "",
        ),
        ("recommendation is a Korean sentence (not a bare title or code)", f"{report['korean_recommendation_share']:.1%}", ""),
    ]
    lines = [
        f"{report['requests']} requests ({report['base_info']} base-info, {report['free_text']} free-text), "
        f"{meta['model']}, {meta['seconds']:.0f} s, {meta['measured_at']}:",
        "",
        "| measure | result | target |",
        "| --- | --- | --- |",
        *[f"| {name} | {value} | {target} |" for name, value, target in rows],
        "",
    ]
    if report["problems"]:
        lines += ["Problems: " + ", ".join(f"{k} ×{v}" for k, v in sorted(report["problems"].items())), ""]
    for i, sample in enumerate(sample_answers, start=1):
        request = ", ".join(f"{k}={v}" for k, v in sample["request"].items())
        lines += [f"Sample {i} ({sample['mode']}: {request}):", "", "```text", sample["text"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    items = workload(args.requests)
    env = {"LEAFRESH_MAX_RUNNING": str(args.concurrency), "LEAFRESH_LOG_LEVEL": "WARNING", "LEAFRESH_PING_INTERVAL_S": "5"}
    started = time.perf_counter()
    with launch_stack("eval", env) as stack:
        results = asyncio.run(_run_all(stack.base_url, items, args.concurrency))
    seconds = time.perf_counter() - started
    from chatbot.runtime import model_settings
    from inference.loading import display_name

    meta = {
        "model": display_name(model_settings().source),
        "seconds": seconds,
        "measured_at": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    report = evaluate(results)
    sample_answers = samples(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(
        json.dumps({**meta, "report": report, "samples": sample_answers}, ensure_ascii=False, indent=2) + "\n"
    )
    text = markdown(report, sample_answers, meta)
    (args.out / "eval.md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.md'}")
    failed = (
        report["valid_close_share"] < 1.0 or report["category_match_share"] < 1.0 or report["json_syntax_in_deltas_share"] > 0
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
