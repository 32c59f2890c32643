"""Reading the live /metrics of the mesh's Python parts (their addresses are in state.json)."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import MeshRunner

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One /metrics answer: its samples and the metric families it declares."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: Samples = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def total(self, name: str, **labels: str) -> float:
        """Sum of `name` over every sample whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def declares(self, name: str) -> bool:
        # The parser names counter families without `_total`.
        return name in self.families or name.removesuffix("_total") in self.families


def metrics_parts(mesh: MeshRunner) -> dict[str, tuple[str, str]]:
    """part name -> (service, metrics address), from state.json."""
    state = mesh.state() or {}
    return {
        p["name"]: (p["extra"]["service"], p["extra"]["metrics"])
        for p in state["parts"]
        if "metrics" in p.get("extra", {})
    }


def scrape(address: str) -> Scrape:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


async def scrape_all(mesh: MeshRunner, service: str | None = None) -> dict[str, Scrape]:
    """part name -> its /metrics now, for every part (or every replica of `service`)."""
    parts = {
        name: part
        for name, part in metrics_parts(mesh).items()
        if service is None or part[0] == service
    }
    scrapes = await asyncio.gather(
        *(asyncio.to_thread(scrape, address) for _, address in parts.values())
    )
    return dict(zip(parts, scrapes, strict=True))
