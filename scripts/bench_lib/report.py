"""Summaries and the printed tables of the benchmark results."""

import statistics

MiB = 1024 * 1024
DOWNLOAD_ROWS = ("s5cmd", "boto3")


def summarize(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "count": len(values)}


def _group_key(result: dict) -> tuple:
    return result["model"], result["loader"], result["latency_ms"]


def add_ratios(results: list[dict]) -> None:
    """Add each row's ratio to the local-disk load and to the best download row."""
    local = {
        (r["model"], r["loader"]): r["summary"]["median"]
        for r in results
        if r["row"] == "local" and r.get("summary")
    }
    best_download: dict[tuple, float] = {}
    for r in results:
        if r["row"] in DOWNLOAD_ROWS and r.get("summary"):
            key = _group_key(r)
            best_download[key] = min(best_download.get(key, float("inf")), r["summary"]["median"])
    for r in results:
        summary = r.get("summary")
        if not summary:
            continue
        base = local.get((r["model"], r["loader"]))
        r["ratio_to_local"] = summary["median"] / base if base else None
        best = best_download.get(_group_key(r))
        r["ratio_to_best_download"] = summary["median"] / best if best else None


def _format_ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    for row in rows:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)


def load_table(results: list[dict]) -> str:
    header = ["model", "loader", "row", "lat ms", "server", "median s", "min-max s",
              "x local", "x best dl", "daemon peak MiB", "note"]
    rows = []
    for r in results:
        summary = r.get("summary")
        if summary:
            seconds = f"{summary['median']:.2f}"
            spread = f"{summary['min']:.2f}-{summary['max']:.2f}"
        else:
            seconds = spread = "-"
        peak = r.get("daemon_peak_rss") or []
        rows.append([
            r["model"], r["loader"], r["row"],
            "-" if r["latency_ms"] is None else str(r["latency_ms"]),
            r.get("server") or "-",
            seconds, spread,
            _format_ratio(r.get("ratio_to_local")),
            _format_ratio(r.get("ratio_to_best_download")),
            f"{max(peak) / MiB:.0f}" if peak else "-",
            r.get("note") or "",
        ])
    return _format_table(header, rows)


def random_access_table(results: list[dict]) -> str:
    header = ["model", "mount", "lat ms", "server", "tensors", "requested MiB", "read MiB",
              "fetched MiB", "fetched/requested", "median s", "min-max s", "note"]
    rows = []
    for r in results:
        summary = r.get("summary")
        requested = r.get("bytes_requested")
        read = r.get("bytes_read")
        fetched = r.get("bytes_fetched")
        rows.append([
            r["model"], r.get("variant", "default"), str(r["latency_ms"]), r.get("server") or "-",
            str(r.get("tensors", "-")),
            f"{requested / MiB:.1f}" if requested is not None else "-",
            f"{read / MiB:.1f}" if read is not None else "-",
            f"{fetched / MiB:.1f}" if fetched is not None else "-",
            f"{fetched / requested:.2f}" if fetched is not None and requested else "-",
            f"{summary['median']:.2f}" if summary else "-",
            f"{summary['min']:.2f}-{summary['max']:.2f}" if summary else "-",
            r.get("note") or "",
        ])
    return _format_table(header, rows)
