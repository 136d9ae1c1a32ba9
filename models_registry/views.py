"""Web pages of the registry: the cache dashboard and its server-drawn SVG chart, both fed by `model_status`."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie

from depthsite.units import format_size
from models_registry.api.permissions import may_operate
from models_registry.api.public import model_status_public, registry_reader_is_public
from models_registry.choices import WeightFormat
from models_registry.selectors import model_status

REFRESH_MS = 4000
# One colour per format, in the chart and its legend; the order of WeightFormat is the stacking order.
FORMAT_COLOURS = {"pt": "#0969da", "safetensors": "#8250df", "h5": "#1a7f37", "pkl": "#bf8700"}
CHART_WIDTH = 720
CHART_LABEL_WIDTH = 130
CHART_TOTAL_WIDTH = 90
CHART_ROW_HEIGHT = 30
CHART_BAR_HEIGHT = 18
CHART_LEGEND_HEIGHT = 30


# Each button of a model's row and the operator action (OPERATOR_PERMISSIONS) it calls.
DASHBOARD_ACTIONS = {"download": "download", "verify": "verify", "convert": "convert", "export": "export",
                     "clear": "cache_clear"}


def _may_view(request: HttpRequest) -> bool:
    # Same rule as the REST reads (models_registry.api.permissions.CanReadRegistry), read per request.
    return bool(settings.DEPTHSITE_PUBLIC_STATUS or request.user.is_authenticated)


def _status_for(request: HttpRequest) -> dict[str, Any]:
    status = model_status()
    return model_status_public(status) if registry_reader_is_public(request.user) else status


def _when(iso: str | None) -> str:
    """'2025-05-01 14:03 UTC' from an ISO time; dashboard.js formats the same way."""
    return f"{iso[:16].replace('T', ' ')} UTC" if iso else "never"


SUMMARY_CHARS = 120


def problem_summary(text: str) -> str:
    """One line for a long error or reason: its first non-empty line, cut at SUMMARY_CHARS (dashboard.js does
    the same); the whole text goes under a details toggle."""
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    return line if len(line) <= SUMMARY_CHARS else line[:SUMMARY_CHARS - 1] + "\u2026"


def _problem(text: str) -> dict[str, str] | None:
    return {"summary": problem_summary(text), "text": text} if text else None


def _file_row(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "last_used": _when(data["last_used_at"]), "problem": _problem(data["health_reason"])}


def _download_row(download: dict[str, Any] | None) -> dict[str, Any] | None:
    if download is None:
        return None
    total = download["bytes_total"]
    text = format_size(download["bytes_done"]) + (f" of {format_size(total)}" if total else "")
    return {**download, "percent": round(100 * (download["progress"] or 0), 1), "text": text,
            "problem": _problem(download["error"])}


def chart_layout(*, status: dict[str, Any]) -> dict[str, Any]:
    """Geometry of a horizontal bar per model, stacked by format, scaled to the largest model; strings, so the
    template writes numbers without locale formatting."""
    bar_width = CHART_WIDTH - CHART_LABEL_WIDTH - CHART_TOTAL_WIDTH
    largest = max((model["bytes"] for model in status["models"]), default=0) or 1
    order = {fmt: index for index, fmt in enumerate(WeightFormat.values)}
    rows = []
    for index, model in enumerate(status["models"]):
        top = CHART_LEGEND_HEIGHT + index * CHART_ROW_HEIGHT
        x = float(CHART_LABEL_WIDTH)
        segments = []
        for weight_file in sorted(model["formats"], key=lambda f: order.get(f["format"], 99)):
            width = bar_width * weight_file["size"] / largest
            segments.append({"x": f"{x:.1f}", "width": f"{max(width, 1):.1f}", "format": weight_file["format"],
                             "colour": FORMAT_COLOURS.get(weight_file["format"], "#59636e"),
                             "title": f"{model['name']} [{weight_file['format']}]: {weight_file['size_human']} "
                                      f"({weight_file['health']})"})
            x += width
        rows.append({"name": model["name"], "segments": segments, "bar_y": f"{top + 6}",
                     "text_y": f"{top + 6 + CHART_BAR_HEIGHT * 0.75:.1f}",
                     "total": format_size(model["bytes"]) if model["bytes"] else "not cached",
                     "total_x": f"{x + 8:.1f}"})
    legend = [{"format": fmt, "colour": FORMAT_COLOURS[fmt], "x": f"{CHART_LABEL_WIDTH + i * 120}"}
              for i, fmt in enumerate(WeightFormat.values)]
    return {"width": CHART_WIDTH, "height": CHART_LEGEND_HEIGHT + len(rows) * CHART_ROW_HEIGHT + 6,
            "label_x": CHART_LABEL_WIDTH - 8, "bar_x": CHART_LABEL_WIDTH, "bar_width": bar_width,
            "bar_height": CHART_BAR_HEIGHT, "rows": rows, "legend": legend, "node": status["node"],
            "total": format_size(status["totals"]["bytes"])}


@never_cache
@ensure_csrf_cookie  # the staff buttons send it back in X-CSRFToken
def dashboard(request: HttpRequest) -> HttpResponse:
    if not _may_view(request):
        return redirect_to_login(request.get_full_path())
    status = _status_for(request)
    models = [{**model,
               "formats": [_file_row(f) for f in model["formats"]],
               "download": _download_row(model["download"]),
               "warm": [{**w, "size_human": format_size(w["bytes"]) if w.get("bytes") else ""} for w in model["warm"]],
               "size_human": format_size(model["bytes"])}
              for model in status["models"]]
    warm_workers: dict[str, dict[str, Any]] = {}
    for model in models:
        for warm in model["warm"]:
            worker = warm_workers.setdefault(warm["worker"], {"worker": warm["worker"], "bytes": 0, "models": []})
            worker["bytes"] += warm.get("bytes") or 0
            worker["models"].append(f"{model['name']} ({warm['size_human'] or 'size unknown'})")
    totals = status["totals"]
    context = {
        "status": status,
        "models": models,
        "totals_human": {"bytes": format_size(totals["bytes"]), "max_bytes": format_size(totals["max_bytes"]),
                         "disk_free": format_size(totals["disk_free"])},
        "chart": chart_layout(status=status),
        "warm_workers": [{**w, "size_human": format_size(w["bytes"])} for w in warm_workers.values()],
        "formats": WeightFormat.values,
        "refresh_ms": REFRESH_MS,
        # The buttons follow the table the API reads (models_registry.api.permissions.OPERATOR_PERMISSIONS).
        "may_optimize": may_operate(request.user, "cache_optimize"),
        "may": {action: may_operate(request.user, operator) for action, operator in DASHBOARD_ACTIONS.items()},
    }
    context["may_any"] = context["may_optimize"] or any(context["may"].values())
    return render(request, "models_registry/dashboard.html", context)


@never_cache
def cache_chart(request: HttpRequest) -> HttpResponse:
    """The chart alone, for dashboard.js to swap in when the cache changes."""
    if not _may_view(request):
        return HttpResponse("sign in to see the model cache", status=403, content_type="text/plain")
    svg = render_to_string("models_registry/cache_chart.svg", {"chart": chart_layout(status=_status_for(request))})
    return HttpResponse(svg, content_type="image/svg+xml")
