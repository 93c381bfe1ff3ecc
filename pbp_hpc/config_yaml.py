"""YAML for configurations: safe_load with limits, so that refusing an input costs no more than its size.

PyYAML's safe_load runs no code, but expands aliases (a few hundred bytes can stand for
gigabytes), recurses once per nesting level and keeps the last of two equal keys. The loader
here refuses all three, and config.read_yaml reads no more than MAX_CONFIG_BYTES.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 8, 6, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def _short_repr(value: Any, limit: int = 80) -> str:
    """A value as the user wrote it, cut short: a 10,000-element list must not flood the terminal.

    reprlib looks at a bounded part of the value (8 items, 3 levels deep), so the cost does not
    grow with it: a shared sub-list repeated a million times costs what one does."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still shown as something
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."



# What a configuration may be: the cost of refusing one is bounded by these, on every rank.
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; 1 MiB is generous
MAX_OVERRIDE_CHARS = 1 << 16
MAX_DEPTH = 32  # nesting levels of YAML collections
MAX_NODES = 100_000  # scalars, lists and mappings in one document


class _Refused(Exception):
    """A YAML document refused before it is built: the message says what and where."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without what a configuration never needs and an attacker would use.

    No aliases or anchors (`&a`, `*a`): expansion is what turns a few hundred bytes into
    gigabytes (the "billion laughs"); no collection nested deeper than MAX_DEPTH (each level
    costs a Python stack frame); no more than MAX_NODES nodes; no key given twice in a mapping.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"YAML aliases (*{event.anchor}) are not allowed in a configuration ({where}); write the value out")
        if getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors (&{event.anchor}) are not allowed in a configuration ({where}); write the value out")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values ({where}): too large to be a configuration")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep ({where}): too deep to be a configuration")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a list or mapping as a key: the constructor refuses it (unhashable)
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _Refused(f"key {_short_repr(key)} is given twice in one mapping, on line {seen[key]} "
                                       f"and on line {line}; keep one")
                    seen[key] = line
                except TypeError:
                    pass
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, as safe_load, with _StrictLoader's limits."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # the limits keep the composer shallow; this is the parser's own stack
        raise _Refused("nested too deeply to be a configuration") from None
    finally:
        loader.dispose()


