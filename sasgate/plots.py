"""The plots dvc.yaml declares, filled as `dvc plots show` fills them, and drawn to SVG offline.

One resolver for a workspace and for a received bundle (both hand it a `Reader`: project-relative
path -> bytes or None), so it never runs DVC on untrusted files: the declarations are read from
dvc.yaml as YAML (stage `plots:` outs first, then the top-level `plots:` list, DVC's order; the
props DVC reads, `dvc.schema.PLOT_PROPS`), the data files they name are parsed as DVC parses them
(JSON, YAML, CSV, TSV), and DVC's own converter and dvc-render fill the template (a project
template in .dvc/plots, else dvc-render's built-in of that name) for the revision `workspace`,
as the page DVC writes does. vl-convert then draws the filled vega-lite spec as SVG (no browser,
no network, no fonts of this machine: its text measurement is its own).

A template may draw only the plot's own data: no `url` or `href` anywhere and no `data` but the
top-level `{"values": "<DVC_METRIC_DATA>"}` (so a bundle's template can neither load files nor
links; vl-convert is also given no base URL it may load from).
"""

from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any, Callable, Iterable, Mapping

import yaml

from .errors import ArtifactError

Reader = Callable[[str], "bytes | None"]

PLOT_PROPS = ("template", "x", "y", "x_label", "y_label", "title", "header")  # dvc.schema.PLOT_PROPS
DATA_SUFFIXES = (".json", ".yaml", ".yml", ".csv", ".tsv")
TEMPLATES_DIR = ".dvc/plots"
REVISION = "workspace"
VEGA_LITE_VERSION = "5.8"  # the oldest vl-convert draws; `dvc plots show` loads vega-lite 5.2.0
DATA_ANCHOR = {"values": "<DVC_METRIC_DATA>"}
_FORBIDDEN_KEYS = ("url", "href")


class PlotError(ArtifactError):
    """A declared plot that cannot be drawn: the message names the plot and why."""


@dataclass(frozen=True)
class Plot:
    """One plot as dvc.yaml declares it."""

    id: str
    props: dict[str, Any] = field(hash=False)
    stage: str | None  # the stage whose out it is; None for the top-level `plots:` list

    @property
    def sources(self) -> list[str]:
        """The data files it reads (dvc.repo.plots.infer_data_sources)."""
        y, x = self.props.get("y"), self.props.get("x")
        files = list(y) if isinstance(y, dict) else [self.id]
        if isinstance(x, dict):
            files.append(next(iter(x)))
        return list(dict.fromkeys(files))


def _relpath(path: Any, where: str) -> str:
    p = PurePosixPath(str(path))
    if not isinstance(path, str) or not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise PlotError(f"dvc.yaml: {where}: {path!r} is not a project-relative path")
    return p.as_posix()


def _props(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw is True:
        return {}
    if not isinstance(raw, dict):
        raise PlotError(f"dvc.yaml: {where}: unreadable plot properties {raw!r}")
    return {k: raw[k] for k in PLOT_PROPS if k in raw}


def _entries(items: Any, where: str) -> Iterable[tuple[str, Any]]:
    if not isinstance(items, list):
        raise PlotError(f"dvc.yaml: {where}: `plots` must be a list")
    for item in items:
        if isinstance(item, str):
            yield item, None
        elif isinstance(item, dict) and len(item) == 1:
            yield next(iter(item.items()))
        else:
            raise PlotError(f"dvc.yaml: {where}: unreadable plot entry {item!r}")


def declared_plots(dvc_yaml: Any) -> list[Plot]:
    """Every plot dvc.yaml declares, in the order `dvc plots show` lists them."""
    if not isinstance(dvc_yaml, dict):
        raise PlotError("dvc.yaml: not a mapping")
    plots: list[Plot] = []
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        if not isinstance(stage, dict) or not stage.get("plots"):
            continue
        if stage.get("wdir", ".") != ".":
            raise PlotError(f"dvc.yaml: stage {name}: plots of a stage with a wdir are not supported")
        for path, raw in _entries(stage["plots"], f"stage {name}"):
            plots.append(Plot(_relpath(path, f"stage {name}"), _props(raw, f"stage {name}: {path}"), name))
    for pid, raw in _entries(dvc_yaml.get("plots") or [], "top-level plots"):
        props = _props(raw, f"top-level plot {pid}")
        for axis in ("x", "y"):
            if isinstance(props.get(axis), dict):
                props[axis] = {_relpath(f, f"plot {pid}: {axis}"): v for f, v in props[axis].items()}
        plot = Plot(str(pid), props, None)
        if not isinstance(props.get("y"), dict):
            _relpath(plot.id, "top-level plots")
        plots.append(plot)
    ids = [p.id for p in plots]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise PlotError(f"dvc.yaml: plots declared twice: {', '.join(dupes)}")
    return plots


def parse_yaml(data: bytes, origin: str) -> Any:
    """YAML without anchors or aliases (a hostile file cannot make a small document expand)."""
    try:
        text = data.decode("utf-8")
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise PlotError(f"{origin}: YAML aliases are not supported here")
        return yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PlotError(f"{origin}: unreadable: {exc}") from None


def parse_json(data: bytes, origin: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PlotError(f"{origin}: unreadable JSON: {exc}") from None


def _data(path: str, raw: bytes, header: bool) -> Any:
    """A data file as dvc.repo.plots.parse reads it."""
    suffix = PurePosixPath(path).suffix
    if suffix == ".json":
        return parse_json(raw, path)
    if suffix in (".yaml", ".yml"):
        return parse_yaml(raw, path)
    if suffix in (".csv", ".tsv"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlotError(f"{path}: not UTF-8") from None
        delim = "\t" if suffix == ".tsv" else ","
        names = None if header else [str(i) for i in range(len(next(csv.reader(io.StringIO(text)), [])))]
        return list(csv.DictReader(io.StringIO(text), delimiter=delim, fieldnames=names))
    raise PlotError(f"{path}: only {', '.join(DATA_SUFFIXES)} plots can be drawn")


def check_template(content: Any, name: str) -> None:
    """Refuse a template that could draw anything but the plot's own data (see the module docstring)."""
    if not isinstance(content, dict):
        raise PlotError(f"template {name}: not a JSON object")
    if content.get("data") != DATA_ANCHOR:
        raise PlotError(f"template {name}: its data must be {json.dumps(DATA_ANCHOR)}")

    def walk(node: Any, top: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _FORBIDDEN_KEYS or (key == "data" and not top):
                    raise PlotError(f"template {name}: {key!r} is not allowed (a template draws the plot's own data)")
                walk(value, False)
        elif isinstance(node, list):
            for value in node:
                walk(value, False)

    walk({k: v for k, v in content.items() if k != "data"}, True)


def template(name: str, read: Reader) -> Any:
    """The named template: the project's .dvc/plots/<name>.json, else dvc-render's built-in."""
    from dvc_render.vega_templates import TEMPLATES, Template

    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise PlotError(f"template {name!r}: give a template name (a file in {TEMPLATES_DIR} or a DVC built-in)")
    stem = name.removesuffix(".json")
    raw = read(f"{TEMPLATES_DIR}/{stem}.json")
    if raw is not None:
        content = parse_json(raw, f"{TEMPLATES_DIR}/{stem}.json")
        check_template(content, stem)
        return Template(content, name=stem)
    for cls in TEMPLATES:
        if cls.DEFAULT_NAME == stem:
            check_template(cls.DEFAULT_CONTENT, stem)
            return cls()
    raise PlotError(f"template {name!r}: not in {TEMPLATES_DIR} and not a DVC built-in")


def vega_lite_spec(plot: Plot, read: Reader) -> dict[str, Any]:
    """The vega-lite spec `dvc plots show` would draw for the plot (its data inlined)."""
    from dvc_render.exceptions import DvcRenderError

    try:
        return renderer(plot, read).get_filled_template()
    except (DvcRenderError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlotError(f"plot {plot.id}: {type(exc).__name__}: {exc}") from None


def renderer(plot: Plot, read: Reader) -> Any:
    """The dvc-render VegaRenderer `dvc plots show` makes for the plot (DVC's converter, revision `workspace`)."""
    from dvc.exceptions import DvcException
    from dvc.render.converter.vega import VegaConverter
    from dvc_render import VegaRenderer

    data = {}
    for src in plot.sources:
        raw = read(src)
        if raw is None:
            raise PlotError(f"plot {plot.id}: its data file {src} is missing")
        data[src] = _data(src, raw, bool(plot.props.get("header", True)))
    props = dict(plot.props, template=template(str(plot.props.get("template") or "linear"), read))
    try:
        datapoints, filled = VegaConverter(plot.id, data, props).flat_datapoints(REVISION)
        if not datapoints:
            raise PlotError(f"plot {plot.id}: no datapoints in {', '.join(plot.sources)}")
        filled.setdefault("title", plot.id)
    except (DvcException, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlotError(f"plot {plot.id}: {type(exc).__name__}: {exc}") from None
    return VegaRenderer(datapoints, plot.id, **filled)


def draw_svg(spec: Mapping[str, Any], origin: str) -> str:
    """The spec drawn as SVG by vl-convert (vega-lite VEGA_LITE_VERSION), loading nothing."""
    try:
        return _draw(json.dumps(spec, sort_keys=True))
    except ValueError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise PlotError(f"plot {origin}: vega-lite could not draw it: {first}") from None


@functools.lru_cache(maxsize=64)
def _draw(spec: str) -> str:
    """A pure function of the spec, so one process draws each spec once."""
    import vl_convert

    return vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION, allowed_base_urls=[])


def renderer_versions() -> dict[str, str]:
    import importlib.metadata

    import vl_convert

    return {"vl-convert-python": importlib.metadata.version("vl-convert-python"),
            "vega-lite": VEGA_LITE_VERSION, "vega": vl_convert.get_vega_version()}


# --- counting what a chart drew ---------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _MarkCounter(HTMLParser):
    """Direct children of vega's data-mark groups (`<g class="mark-... role-mark">`) per container id."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.ids, self.counts = ids, {i: 0 for i in ids}
        self.stack: list[tuple[str, str | None, bool]] = []  # (tag, container id, is a mark group)

    def _container(self) -> str | None:
        return next((c for _, c, _ in reversed(self.stack) if c is not None), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.stack and self.stack[-1][2]:
            if (box := self._container()) is not None:
                self.counts[box] += 1
        classes = (a.get("class") or "").split()
        is_marks = tag == "g" and "role-mark" in classes and not any(c == "mark-group" for c in classes)
        own = a.get("id") if a.get("id") in self.ids else None
        if tag not in _VOID:
            self.stack.append((tag, own, is_marks))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


def count_marks(markup: str, ids: Iterable[str]) -> dict[str, int]:
    """How many data marks (bars, points, lines, bands...) vega drew inside each element with these ids.

    Axes, legends and titles are not marks; a chart that failed or drew nothing counts 0.
    """
    parser = _MarkCounter(set(ids))
    parser.feed(markup)
    parser.close()
    return parser.counts
