"""Grammars (GBNF) that keep llama.cpp's output to a JSON document: any object, or one valid against a
JSON schema (OpenAI's `response_format`).

The schema is converted by llama-cpp-python's own converter (`llama_grammar.SchemaConverter`, the same
as llama.cpp's `json_schema_to_grammar`). That converter silently drops what it cannot express (number
ranges, `oneOf`'s exclusivity, `not`, ...): a reply would then parse and still break the schema. So the
schema is checked first against what it does enforce, and anything else is refused with the keyword
and where it is (InvalidInput naming `response_format`, a 400), never ignored. Annotations (`title`,
`description`, `default`, `examples`, ...) and unknown keywords are ignored, as JSON Schema says.

Two fixes to the converter's output: its string characters allow raw control characters (a newline inside
a string), which JSON forbids and `json.loads` refuses; here they must be escaped, as in llama.cpp's
own JSON grammar. And its `date` (of the formats date and date-time) allows any day 01-31 in any month
and the year 0000, so that "2023-02-30" came out of a schema asking for a date; here a date is one of the
calendar (February 29 in leap years only).

Conversion is pure Python and costs a few milliseconds for a typical schema: the engine runs it off
the event loop, and the last schemas are cached by their text (an application sends the same one
again and again).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from node_agent.engines.base import InvalidInput, ResponseFormat

# Keywords the converter enforces, by the kind of schema they apply to.
_STRUCTURE = {"type", "enum", "const", "anyOf", "$ref", "$defs", "definitions"}
_OBJECT = {"properties", "required", "additionalProperties"}
_ARRAY = {"items", "prefixItems", "minItems", "maxItems"}
_STRING = {"pattern", "format", "minLength", "maxLength"}
# Assertions of JSON Schema (2020-12 and older drafts) that the converter does not enforce.
_UNSUPPORTED = {
    "minimum": "number ranges",
    "maximum": "number ranges",
    "exclusiveMinimum": "number ranges",
    "exclusiveMaximum": "number ranges",
    "multipleOf": "multipleOf",
    "oneOf": "oneOf (use anyOf)",
    "allOf": "allOf",
    "not": "not",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
    "uniqueItems": "uniqueItems",
    "contains": "contains",
    "minContains": "contains",
    "maxContains": "contains",
    "minProperties": "minProperties/maxProperties",
    "maxProperties": "minProperties/maxProperties",
    "patternProperties": "patternProperties",
    "propertyNames": "propertyNames",
    "dependentRequired": "dependencies",
    "dependentSchemas": "dependencies",
    "dependencies": "dependencies",
    "unevaluatedProperties": "unevaluatedProperties",
    "unevaluatedItems": "unevaluatedItems",
    "additionalItems": "additionalItems",
    "contentEncoding": "content keywords",
    "contentMediaType": "content keywords",
    "contentSchema": "content keywords",
    "$dynamicRef": "$dynamicRef",
    "$recursiveRef": "$recursiveRef",
}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
# Bounds on what the grammar grows with: nesting (the converter recurses), counted repetitions (each count
# is written out as rules) and the grammar's own size.
MAX_DEPTH = 32
MAX_COUNT = 1000
MAX_GRAMMAR_CHARS = 262_144
# The converter's string character, and the same without the control characters JSON forbids raw.
_CHAR = r'[^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
# The converter's date, and a date of the calendar: a year 0001-9999, each month's own days, and February 29
# when the year is a leap year (divisible by 4, and by 400 for a century).
_DATE = '[0-9] [0-9] [0-9] [0-9] "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )'
_CALENDAR_DATE = (
    '( [0-9] [0-9] [0-9] [1-9] | [0-9] [0-9] [1-9] "0" | [0-9] [1-9] "00" | [1-9] "000" ) "-" ('
    ' ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )'
    ' | ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" )'
    ' | "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) )'
    ' | ( [0-9] [0-9] ( "0" [48] | [2468] [048] | [13579] [26] ) | ( "0" [48] | [2468] [048] | [13579] [26] ) "00" )'
    ' "-02-29"'
)


class _Refused(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{what} (at {where or 'the root'})")


def _count(node: dict[str, Any], key: str, where: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise _Refused(where, f"'{key}' must be an integer from 0 to {MAX_COUNT}")
    return value


def _check(node: Any, where: str, depth: int) -> None:
    """Refuse what the converter would ignore or cannot build (raises _Refused)."""
    if depth > MAX_DEPTH:
        raise _Refused(where, f"the schema nests deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise _Refused(where, "a schema must be a JSON object here (true/false schemas are not supported)")
    for key, what in _UNSUPPORTED.items():
        if key in node:
            raise _Refused(where, f"'{key}' is not supported: the grammar cannot enforce {what}")
    kind = node.get("type")
    if isinstance(kind, list):
        if not kind or not all(isinstance(k, str) and k in _TYPES for k in kind):
            raise _Refused(where, f"'type' must name types among {sorted(_TYPES)}")
        if set(node) & (_OBJECT | _ARRAY | _STRING | {"enum", "const", "anyOf"}):
            raise _Refused(where, "a list of types with other keywords is not supported (use anyOf)")
    elif kind is not None and kind not in _TYPES:
        raise _Refused(where, f"'type' must be one of {sorted(_TYPES)}; got {json.dumps(kind)[:80]}")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/"))):
        raise _Refused(where, "only local references ('#' or '#/...') are supported in '$ref'")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise _Refused(where, "'enum' must be a non-empty list")
    if "anyOf" in node and (not isinstance(node["anyOf"], list) or not node["anyOf"]):
        raise _Refused(where, "'anyOf' must be a non-empty list")
    # The converter takes the first of these that a schema has and drops the rest of them.
    used = [k for k in ("$ref", "anyOf", "const", "enum", "pattern", "format") if k in node]
    strings = [k for k in ("pattern", "format", "minLength", "maxLength") if k in node]
    if len(used) > 1 or (strings and len(strings) > 1 and not set(strings) <= {"minLength", "maxLength"}):
        both = used if len(used) > 1 else strings
        raise _Refused(where, f"'{both[0]}' with '{both[1]}' in one schema is not supported")
    if used and set(node) & (_OBJECT | _ARRAY):
        raise _Refused(where, f"'{used[0]}' beside object or array keywords is not supported")
    if "format" in node and node["format"] not in _FORMATS:
        raise _Refused(
            where, f"format {json.dumps(node['format'])[:80]} is not supported; supported: {sorted(_FORMATS)}"
        )
    if "pattern" in node:
        if not isinstance(node["pattern"], str):
            raise _Refused(where, "'pattern' must be a string")
        node["pattern"] = _full_match(_plain_escapes(node["pattern"], where))
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        lo, hi = _count(node, low, where), _count(node, high, where)
        if lo is not None and hi is not None and lo > hi:
            raise _Refused(where, f"'{low}' is greater than '{high}'")
    if "items" in node and "prefixItems" in node:
        raise _Refused(where, "'items' with 'prefixItems' is not supported")
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        raise _Refused(where, "'properties' must be an object")
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Refused(where, "'required' must be a list of property names")
    missing = [r for r in required if r not in properties]
    if missing:
        raise _Refused(where, f"'required' names '{missing[0]}', which is not in 'properties'")
    for name, sub in properties.items():
        _check(sub, f"{where}/properties/{name}", depth + 1)
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        _check(extra, f"{where}/additionalProperties", depth + 1)
    items = node.get("items", node.get("prefixItems"))
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _check(sub, f"{where}/items/{i}", depth + 1)
    elif items is not None:
        _check(items, f"{where}/items", depth + 1)
    for i, sub in enumerate(node.get("anyOf", [])):
        _check(sub, f"{where}/anyOf/{i}", depth + 1)
    for key in ("$defs", "definitions"):
        defs = node.get(key, {})
        if not isinstance(defs, dict):
            raise _Refused(where, f"'{key}' must be an object")
        for name, sub in defs.items():
            _check(sub, f"{where}/{key}/{name}", depth + 1)


# The converter reads `\d`, `\w`, `\.` as literal text (and repeats the wrong thing after them): written as the
# character classes they stand for, which it does read. `\s` as a space only: a narrower set, whose strings
# still match, since a raw tab or newline is no JSON string character.
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}


def _plain_escapes(pattern: str, where: str) -> str:
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c != "\\" or i == len(pattern):
            if c == "[" and not in_class:
                in_class = True
            elif c == "]" and in_class and out and out[-1] not in ("[", "[^"):
                in_class = False
            out.append(c)
            continue
        e = pattern[i]
        i += 1
        if e in _CLASSES:
            out.append(_CLASSES[e] if in_class else f"[{_CLASSES[e]}]")
        elif e in "DWS":
            raise _Refused(where, f"'\\{e}' in a pattern is not supported; write the class, such as [^0-9]")
        elif e.isalnum() or e in "[]\\^-":
            out.append("\\" + e)  # \n, \t, \uXXXX, and what a class must keep escaped
        else:  # an escaped punctuation mark: itself, as a class of one outside a class
            out.append(e if in_class else f"[{e}]")
    return "".join(out)


def _full_match(pattern: str) -> str:
    """A JSON Schema `pattern` (which matches anywhere in the string) as the anchored one the converter takes:
    the whole string matches it, which also satisfies the pattern, as constrained decoders (xgrammar, Outlines)
    read it. Pydantic writes `Field(pattern=...)` as given, usually without anchors."""
    starts = pattern.startswith("^")
    backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    ends = pattern.endswith("$") and backslashes % 2 == 0  # not an escaped "\\$"
    if starts and ends:
        return pattern
    body = pattern[1 if starts else 0 : len(pattern) - 1 if ends else len(pattern)]
    return f"^({body})$"


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: Any, schema_text: str, name: str, url: str, refused: str, param: str) -> str:
    """Check one schema and add its rules to `converter` under `name` (root when ""); the name of its rule.
    What the grammar cannot enforce raises InvalidInput naming `param`, its message starting `refused`."""
    try:
        schema = json.loads(schema_text)
        _check(schema, "", 0)
        schema = _root_as_definition(schema)
        if name:
            schema = _prefixed_definitions(schema, name)
        return str(converter.visit(_resolve_refs(converter, schema, url), name))
    except _Refused as exc:
        raise InvalidInput(f"{refused}: {exc}", param) from exc
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError, IndexError) as exc:
        raise InvalidInput(f"{refused}: the grammar converter failed: {exc}"[:500], param) from exc


ROOT_DEFINITION = "recursive-root"


def _root_as_definition(schema: Any) -> Any:
    """A schema that refers to itself as a whole (`"$ref": "#"`, OpenAI's example of a recursive schema) as one
    whose root is a definition: the converter follows only `#/...` paths. Unchanged when nothing refers to `#`."""

    found = False

    def renamed(node: Any) -> Any:
        nonlocal found
        if isinstance(node, list):
            return [renamed(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: renamed(value) for key, value in node.items()}
        if out.get("$ref") == "#":
            found = True
            out["$ref"] = f"#/$defs/{ROOT_DEFINITION}"
        return out

    if not isinstance(schema, dict):
        return schema
    body = renamed({key: value for key, value in schema.items() if key not in ("$defs", "definitions")})
    definitions = {key: renamed(schema[key]) for key in ("$defs", "definitions") if key in schema}
    if not found:
        return schema
    definitions["$defs"] = {**definitions.get("$defs", {}), ROOT_DEFINITION: body}
    return {**definitions, "$ref": f"#/$defs/{ROOT_DEFINITION}"}


def _resolve_refs(converter: Any, schema: Any, url: str) -> Any:
    """`converter.resolve_refs`, which does not look inside an object that has a `$ref` (llama.cpp's own
    converter has the same walk): the `$defs` beside a root `$ref` kept their refs unresolved, and the
    converter failed on them. That is Pydantic's schema of a recursive model, `{"$defs": {"Node": {...
    "$ref": "#/$defs/Node" ...}}, "$ref": "#/$defs/Node"}`. So the root's siblings are resolved first."""
    if isinstance(schema, dict) and "$ref" in schema:
        ref = schema.pop("$ref")
        converter.resolve_refs(schema, url)  # refs point into `schema`, the root, which keeps its $defs
        schema["$ref"] = ref
    return converter.resolve_refs(schema, url)


def _prefixed_definitions(schema: Any, prefix: str) -> Any:
    """The schema with its definitions renamed `<prefix>-<name>` (and its references with them). The
    converter names a referenced definition's rule by the definition's own name, so two tools that both
    define `Item` would share one rule: a prefix per tool keeps them apart. Only references into the root's
    `$defs`/`definitions` can be renamed; any other is refused."""
    if not isinstance(schema, dict):
        return schema
    renamed = dict(schema)
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            renamed[key] = {f"{prefix}-{name}": sub for name, sub in schema[key].items()}

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, list):
            return [walk(item, f"{where}/{i}") for i, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v, f"{where}/{k}") for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str):
            head, _, name = ref.rpartition("/")
            if head not in ("#/$defs", "#/definitions"):
                raise _Refused(where, "only references to '#/$defs/...' or '#/definitions/...' are supported here")
            out["$ref"] = f"{head}/{prefix}-{name}"
        return out

    return walk(renamed, "")


def _finished(grammar: str, refused: str, param: str) -> str:
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidInput(f"{refused}: its grammar is over {MAX_GRAMMAR_CHARS} characters", param)
    return grammar.replace(f"char ::= {_CHAR}", f"char ::= {_JSON_CHAR}").replace(
        f"date ::= {_DATE}", f"date ::= {_CALENDAR_DATE}"
    )


# How a response_format's schema the grammar cannot enforce is refused, alone or beside tools.
RESPONSE_FORMAT_REFUSED = "'response_format.json_schema.schema' cannot be enforced by the llama.cpp engine"


@functools.lru_cache(maxsize=128)
def schema_grammar(schema_text: str) -> str:
    """The GBNF of a JSON schema's text; raises InvalidInput naming `response_format` when the grammar
    cannot enforce it. Exceptions are not cached: a refused schema is checked again (it is cheap)."""
    converter = _converter()
    _visit(converter, schema_text, "", "request", RESPONSE_FORMAT_REFUSED, "response_format")
    return _finished(converter.format_grammar(), RESPONSE_FORMAT_REFUSED, "response_format")


# A function without parameters takes the empty object only.
NO_PARAMETERS = '{"type": "object", "properties": {}, "additionalProperties": false}'


# response_format json_object as a schema: any object (the converter's rules, so that they sit beside others).
ANY_OBJECT = '{"type": "object"}'
CONTENT_RULE = "content"


@functools.lru_cache(maxsize=128)
def arguments_grammar(parameters: tuple[str, ...], content: str = "") -> tuple[str, tuple[str, ...]]:
    """The GBNF rules (no root) of several functions' arguments, from their parameters schemas' texts ("":
    no parameters), and the rule of each. Raises InvalidInput naming `tools[i].function.parameters` when
    the grammar cannot enforce one. With `content`, a JSON schema's text (a response_format beside the
    tools), its rules are added too, under CONTENT_RULE, or InvalidInput names `response_format`."""
    converter = _converter()
    names = []
    for i, text in enumerate(parameters):
        param = f"tools[{i}].function.parameters"
        refused = f"'{param}' cannot be enforced by the llama.cpp engine"
        names.append(_visit(converter, text or NO_PARAMETERS, f"tool{i}-arguments", f"tools/{i}", refused, param))
    if content:
        rule = _visit(converter, content, CONTENT_RULE, "request", RESPONSE_FORMAT_REFUSED, "response_format")
        assert rule == CONTENT_RULE  # the converter names a rule as asked unless the name is taken
    return _finished(converter.format_grammar(), "the tools' parameters cannot be enforced", "tools"), tuple(names)


def content_schema(response_format: ResponseFormat) -> str:
    """The JSON schema's text a response_format asks the content to follow (any object for json_object)."""
    return ANY_OBJECT if response_format.kind == "json_object" else response_format.schema


def grammar_for(response_format: ResponseFormat) -> str:
    """The GBNF for a response_format (its root rule is `root`)."""
    if response_format.kind == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF  # root ::= object; its strings already refuse raw control characters
    return schema_grammar(response_format.schema)
