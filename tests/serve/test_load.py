"""A bounded load test on the main app: 200 requests at concurrency 16, zero 5xx, and every
answer equal to the same request served alone."""

from __future__ import annotations

import asyncio
import itertools

import httpx
from _helpers import API_KEY, data_url, scene_png

MODEL = "tiny-vlm"


def requests(media) -> list[dict]:
    a, b = data_url(scene_png(21)), media.url("/c.png")
    prompts = ["how many shapes?", "what colour is the circle?", "describe the picture."]
    images = [[], [a], [b], [a, b]]
    out = []
    for text, imgs in itertools.product(prompts, images):
        content = [{"type": "image_url", "image_url": {"url": u}} for u in imgs] + [{"type": "text", "text": text}]
        out.append({"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]})
    return out


def test_load_200_requests_concurrency_16(main_app, media):
    bodies = requests(media)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def run() -> tuple[list[str], list[tuple[int, int, str]]]:
        async with httpx.AsyncClient(base_url=main_app, headers=headers, timeout=60) as c:
            alone = []
            for body in bodies:  # one at a time: the unbatched answers
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                alone.append(r.json()["choices"][0]["message"]["content"])
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> tuple[int, int, str]:
                async with sem:
                    r = await c.post("/v1/chat/completions", json=bodies[i % len(bodies)])
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
                    return i, r.status_code, text

            results = await asyncio.gather(*[one(i) for i in range(200)])
        return alone, results

    alone, results = asyncio.run(run())
    codes = [code for _, code, _ in results]
    assert not [c for c in codes if c >= 500], f"5xx answers: {codes}"
    refused = [(i, code, text[:300]) for i, code, text in results if code != 200]
    assert not refused, f"{len(refused)} of 200 not answered: {refused[:3]}"
    wrong = [(i, text, alone[i % len(bodies)]) for i, _, text in results if text != alone[i % len(bodies)]]
    assert not wrong, wrong[:3]
