"""Reading a template's YAML: the data, its node tree (for line numbers), and the two problems
PyYAML itself lets through or misplaces.

1. **Duplicate keys.** PyYAML keeps the last value of a repeated key without a word, so a second
   `metadata.name` silently renames the DAG. Every repeated key is an error here, with the line
   of each occurrence and the field path.
2. **Alias bombs.** An anchor used nine times in a list, itself used nine times, ... ("billion
   laughs") expands to billions of values from a few lines. Building (and validating) them would
   stall the DAG file past Airflow's import timeout and hide every template's DAG, so the values
   built are counted and a document over `MAX_VALUES` is refused at the alias that crossed it.
3. **Syntax error lines.** PyYAML reports where it *noticed* a problem, which is often after it:
   an unclosed `[` or quote is noticed lines later, a key without its `:` on the next key's line.
   The issue points at the line where the broken construct starts and names both lines.

The document is composed once (the C parser when libyaml is there) and constructed from that
node tree, which validation errors reuse to find their line. Only PyYAML is imported: this runs
on every DAG parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from arf_training.errors import TemplateError, TemplateIssue

_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_VALUES = 100_000
"""Scalars, lists and mappings one template may build, aliases expanded (a real one has a few
hundred)."""


class _TooManyValues(yaml.YAMLError):
    """The document expands to more than MAX_VALUES values (raised at the node that crossed)."""

    def __init__(self, mark: Any):
        super().__init__()
        self.mark = mark


@dataclass(frozen=True)
class YamlDocument:
    """A template file's data and the node tree it was built from (None for an empty file)."""

    data: Any
    root: yaml.Node | None


def read_yaml(text: str, path: str) -> YamlDocument:
    """Parse one template file. Raises `TemplateError` for a syntax error or repeated keys."""
    loader = _LOADER(text)
    try:
        root = loader.get_single_node()
        builder = _Builder(loader, path)
        data = builder.build(root, ()) if root is not None else None
    except _TooManyValues as exc:
        raise TemplateError([TemplateIssue(
            file=path, line=exc.mark.line + 1,
            message=f"the document expands to more than {MAX_VALUES:,} values once its aliases "
                    "are expanded (the value at this line crossed the limit): anchors reused "
                    "inside other reused anchors multiply; a template needs a few hundred "
                    "values, so write them out or nest fewer aliases")]) from None
    except yaml.YAMLError as exc:
        raise TemplateError([syntax_issue(text, path, exc)]) from exc
    finally:
        loader.dispose()
    if builder.duplicates:
        raise TemplateError(sorted(builder.duplicates, key=lambda i: i.line or 0))
    return YamlDocument(data=data, root=root)


MAX_TEMPLATE_BYTES = 1024 * 1024
"""Largest template file read. A real one is a few KiB; reading and parsing a stray data dump
named *.yaml would stall the DAG files past Airflow's import timeout, hiding every DAG."""


def decode_template(raw: bytes, path: str) -> str:
    """The file's text; a file over the size cap or not in UTF-8 is an issue (replacing the
    bytes that do not decode would silently change a query or a name)."""
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise TemplateError([TemplateIssue(
            file=path, message=f"file is over {MAX_TEMPLATE_BYTES:,} bytes, the limit of a "
                               "template (a real one is a few KiB); is it a template? Move "
                               "other files out of the templates folder")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TemplateError([TemplateIssue(
            file=path, line=line,
            message=f"byte 0x{raw[exc.start]:02x} at line {line}, column {column} is not UTF-8 "
                    "(templates are UTF-8 text); save the file as UTF-8")]) from None


def node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[yaml.Node | None, int]:
    """The YAML node for a pydantic error location (deepest one that exists), and its depth."""
    node, depth = root, 0
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, _ in node.value if k.value == str(part)), None)
            if match is None:
                # Tags of discriminated unions (e.g. 'integer') are not keys; skip them.
                continue
            node, depth = (match if part != loc[-1] else key or match), depth + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node, depth = node.value[part], depth + 1
    return node, depth


# -- building the data, and duplicate keys -------------------------------------------------------

_STR, _SEQ, _MAP = (f"tag:yaml.org,2002:{t}" for t in ("str", "seq", "map"))
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    """Python data from the node tree, noting every repeated key on the way (one walk).

    PyYAML's own constructors handle non-string scalars (int, float, bool, null, timestamp)
    and other collection tags; strings, lists and dicts are built here, which is faster than
    PyYAML's generic constructor and gives each key its path. Keys merged in with
    `<<: *defaults` may be overridden: only keys written in the mapping itself are compared.
    """

    def __init__(self, loader: Any, path: str):
        self.loader = loader
        self.path = path
        self.duplicates: list[TemplateIssue] = []
        self._open: set[int] = set()  # collections being built: an alias to one is a cycle
        self._built = 0  # values built so far, every expansion of an alias counted

    def build(self, node: yaml.Node, where: tuple[str, ...]) -> Any:
        self._built += 1
        if self._built > MAX_VALUES:
            raise _TooManyValues(node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            return node.value if node.tag == _STR else self.loader.construct_object(node)
        if id(node) in self._open:
            raise yaml.constructor.ConstructorError(
                None, None, "found a recursive alias (an anchor used inside itself)",
                node.start_mark)
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                return [self.build(item, (*where, str(i))) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
                return self._mapping(node, where)
            return self.loader.construct_object(node, deep=True)  # !!set, !!omap, ...
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, where: tuple[str, ...]) -> dict[Any, Any]:
        data: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.update(self._merge_sources(node, value_node, where))
                continue
            key = self.build(key_node, where)
            if isinstance(key_node, yaml.ScalarNode):
                line, identity = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
                if identity in first_line:
                    self.duplicates.append(TemplateIssue(
                        file=self.path, line=line, field=".".join((*where, key_node.value)),
                        message=f"duplicate key {key_node.value!r} (first at line "
                                f"{first_line[identity]}): YAML would silently keep only the "
                                "last value; keep one of them"))
                else:
                    first_line[identity] = line
            value = self.build(value_node, (*where, str(key)))
            try:
                data[key] = value
            except TypeError as exc:  # a list or mapping used as a key
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key",
                    key_node.start_mark) from exc
        return {**merged, **data} if merged else data

    def _merge_sources(self, node: yaml.Node, value: yaml.Node,
                       where: tuple[str, ...]) -> dict[Any, Any]:
        """`<<: *a` or `<<: [*a, *b]` (earlier sources win, as in PyYAML)."""
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            built = self.build(source, where)
            if not isinstance(built, dict):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "expected a mapping (or a list of mappings) for merging", source.start_mark)
            merged.update(built)
        return merged


# -- syntax errors -------------------------------------------------------------------------------

class _TracingLoader(yaml.SafeLoader):
    """The pure-Python loader, remembering the scalars it scanned: the one just before an
    error often spans lines it should not (an unclosed quote, a key without its colon), and
    its first line is the one to fix. Used only to explain an error, never on the normal path."""

    def __init__(self, text: str):
        super().__init__(text)
        self.scalars: list[Any] = []

    def scan_plain(self) -> Any:
        token = super().scan_plain()
        self.scalars.append(token)
        return token

    def scan_flow_scalar(self, style: Any) -> Any:
        token = super().scan_flow_scalar(style)
        self.scalars.append(token)
        return token


def _python_error(text: str) -> tuple[yaml.MarkedYAMLError | None, Any]:
    """The pure-Python loader's error for `text` (its messages are more specific than
    libyaml's) and the last scalar that ended before the error's position."""
    loader = _TracingLoader(text)
    try:
        loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        before = [t for t in loader.scalars if mark is None or t.end_mark.index <= mark.index]
        return exc, before[-1] if before else None
    except yaml.YAMLError:
        pass
    finally:
        loader.dispose()
    return None, None


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def syntax_issue(text: str, path: str, exc: yaml.YAMLError) -> TemplateIssue:
    """The issue for a YAML error, at the line where the broken construct starts.

    PyYAML's `problem_mark` is where it gave up. When the error has a context that *starts*
    the broken construct (an unclosed quote, flow `[`/`{`, a simple key), that context's line
    is where to look; a block mapping's context is only the enclosing section, so there the
    problem line stays. A `:` that is "not allowed here" after a value spanning several lines
    means the value's first line is a key missing its colon.
    """
    detailed, scalar = _python_error(text)
    error = detailed or exc
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    problem_mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    if problem_mark is None:
        return TemplateIssue(file=path, message=f"YAML syntax error: {problem}")
    line = problem_mark.line + 1
    parts = [f"{problem} ({_at(problem_mark)})"]
    if context and context_mark is not None:
        parts.insert(0, f"{context} ({_at(context_mark)})")
        if context.startswith(("while scanning", "while parsing a flow")):
            line = context_mark.line + 1
    hint = _hint(problem, context, line)
    if scalar is not None and scalar.start_mark.line < min(line - 1, problem_mark.line):
        # The value just before the problem began lines earlier: that is where it went wrong.
        if scalar.style in ("'", '"'):
            line = scalar.start_mark.line + 1
            hint = (f"the quoted value opened at line {line} runs on to line "
                    f"{scalar.end_mark.line + 1}: close its quote at line {line}")
        elif problem.startswith("mapping values are not allowed"):
            line, hint = _run_on_value(text, scalar.start_mark, problem_mark)
    return TemplateIssue(file=path, line=line,
                         message=f"YAML syntax error: {': '.join(parts)}; {hint}")


def _hint(problem: str, context: str | None, line: int) -> str:
    if isinstance(context, str) and context.startswith("while parsing a flow"):
        return f"close the '[' or '{{' opened at line {line}, or add the missing ','"
    if isinstance(context, str) and context.startswith("while scanning a simple key"):
        return f"add the ':' after the key at line {line}"
    if isinstance(context, str) and context.startswith("while scanning a quoted"):
        return f"close the quote opened at line {line}"
    if "'\\t'" in problem:  # the tab, as PyYAML quotes it
        return "indent with spaces: YAML does not allow tabs"
    if "constructor for the tag" in problem:
        return "templates are plain YAML: remove the '!!' tag"
    return f"fix the indentation or quoting at line {line}"


def _run_on_value(text: str, start: Any, problem: Any) -> tuple[int, str]:
    """Where a plain value that ran on from an earlier line onto the `:` at `problem` went
    wrong: a key without its colon when the value is at the start of its line, else the
    problem line, indented deeper than the key whose value it continues."""
    first, last = start.line + 1, problem.line + 1
    start_line = text.splitlines()[start.line] if text else ""
    in_key_position = start.column == len(start_line) - len(start_line.lstrip(" -"))
    if in_key_position:
        return first, (f"'{start_line.strip()}' at line {first} is read as the start of a "
                       f"value running on to line {last}: add the ':' after its key")
    return last, (f"line {last} is indented deeper than the key above it, so it continues the "
                  f"value from line {first}; align it with that key")
