"""YAML read as untrusted input: size, value count, nesting depth and alias expansion bounded before anything is built.

Real configs are a few KiB and a few hundred values; an alias bomb ("billion laughs") is refused
from the composed node graph, before it expands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import ConfigError

__all__ = ["BoundedLoader", "YamlLimitError", "load_yaml", "read_yaml_file"]

# --- limits: a config is untrusted input, so what it can ask for is bounded --------------------------------
# Real configs are a few KiB, a few hundred values, at most six levels deep and use a handful of anchors;
# the YAML limits are 100x that, and refuse an alias bomb ("billion laughs": 30 lines that expand to 10^9
# values) from the composed node graph, before anything is expanded.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 1_000
MAX_INT_DIGITS = 32  # longer integer literals are typos or attacks (Python refuses > 4300 digits with a ValueError)


class YamlLimitError(yaml.YAMLError):
    """A YAML document asks for more than a config may: too big, too deep, too many aliases.

    ``key`` is the dotted key where the problem sits ("" for the whole document)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key or '(top level)'}: {problem}")
        self.key = key
        self.problem = problem


_YAML12_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with limits checked while composing, before any value is constructed.

    The composer builds a node graph in which an alias is one shared node, so its size is the
    size of the text; expanding that graph into Python values is what makes an alias bomb
    explode. So nesting depth and alias count are checked as nodes are composed, and the
    expanded size and depth are computed from the graph (each node once) before
    construction. Recursive aliases are refused. Keys are tracked so errors name them.
    ``1e9`` and ``1e-3`` load as numbers (YAML 1.2, what people write) rather than strings.
    """

    def __init__(self, stream: str, prefix: Sequence[str] = ()) -> None:
        super().__init__(stream)
        self._keys: list[str] = list(prefix)
        self._aliases = 0
        self._node_keys: dict[int, str] = {}

    def _dotted_key(self) -> str:
        return ".".join(k for k in self._keys if k)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        label = index.value if isinstance(index, yaml.ScalarNode) else "" if index is None else str(index)
        self._keys.append(str(label)[:40])
        try:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise YamlLimitError(
                        self._dotted_key(),
                        f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out instead",
                    )
                return super().compose_node(parent, index)  # the shared node keeps the key of its anchor
            if len(self._keys) > MAX_YAML_DEPTH:
                raise YamlLimitError(
                    self._dotted_key(),
                    f"nested more than {MAX_YAML_DEPTH} levels deep; "
                    "a config needs a handful of levels, flatten this value",
                )
            node = super().compose_node(parent, index)
            self._node_keys[id(node)] = self._dotted_key()
            return node
        finally:
            self._keys.pop()

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node, self._node_keys)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise YamlLimitError(
                self._node_keys.get(id(node), ""),
                f"an integer of {len(node.value)} characters; no setting needs more than {MAX_INT_DIGITS}",
            )
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_EXPONENT, list("-+0123456789."))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, node_keys: dict[int, str]) -> None:
    """Refuse a node graph whose expansion (aliases copied out) is too big, too deep or infinite.

    Iterative, each node once: sizes of shared (aliased) nodes are memoised, so a graph
    that would expand to 10^9 values is measured in as many steps as it has nodes."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [sizes[id(k)] for k in _children(node)]
            sizes[key] = (1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0))
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlLimitError(
                node_keys.get(key, ""),
                "a recursive alias (a value that contains itself); a config is a tree, write the value out",
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in sizes)
    values, depth = sizes[id(root)]
    if values > MAX_YAML_VALUES:
        where = _largest_key(root, lambda n: sizes[id(n)][0] > MAX_YAML_VALUES, node_keys)
        raise YamlLimitError(
            where,
            f"anchors and aliases expand this to {values:.3g} values, more than the "
            f"{MAX_YAML_VALUES} a config may hold (an alias bomb?); write the values out or use fewer aliases",
        )
    if depth > MAX_YAML_DEPTH:
        where = _largest_key(root, lambda n: sizes[id(n)][1] > MAX_YAML_DEPTH - 1, node_keys)
        raise YamlLimitError(
            where,
            f"aliases nest this {depth} levels deep, more than {MAX_YAML_DEPTH}; "
            "a config needs a handful of levels, flatten this value",
        )


def _largest_key(root: yaml.Node, too_big: Any, node_keys: dict[int, str]) -> str:
    """The deepest mapping key on the one path of too-big values (where an alias bomb starts)."""
    node = root
    while isinstance(node, yaml.MappingNode):
        big = [value for _, value in node.value if too_big(value)]
        if len(big) != 1:
            break
        node = big[0]
    return node_keys.get(id(node), "")


def load_yaml(text: str, prefix: Sequence[str] = ()) -> Any:
    """Load YAML within the limits above (see :class:`BoundedLoader`).

    ``prefix`` is the dotted key the text sits under (an override's key), so that depth
    counts from there and errors name the full key.

    Raises:
        YamlLimitError: the document asks for too much (names the dotted key).
        yaml.YAMLError: the text is not YAML.
    """
    loader = BoundedLoader(text, prefix)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """A YAML file read within the limits (size, depth, aliases); every problem is a ConfigError naming it.

    Used for experiment configs and the nightly config alike, so neither can be a bomb.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)  # bounded: a config path may name /dev/zero or a huge file
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_CONFIG_BYTES} bytes, far more than a config holds; "
                "check that this is the config file"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        return load_yaml(text) or {}
    except YamlLimitError as exc:
        raise ConfigError(f"{path}: {exc.key or '(top level)'}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
