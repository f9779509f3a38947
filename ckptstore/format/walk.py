"""The one walker over state trees.

A state is a tree of dict / OrderedDict / list / tuple containers with
leaves in them. Three things walk it: the encoder (to build the node table),
the async snapshot (to copy every tensor away from training) and the
Lightning plugin (to turn its ``AttributeDict`` into plain dicts). They
share this walker, so the rules live once:

- a dict's children are its keys and values, alternating, in insertion order;
- an ``OrderedDict``'s ``_metadata`` attribute (what ``nn.Module.state_dict()``
  records, and ``load_state_dict()`` needs) is one more child after them;
- a container that holds itself is refused, naming where;
- no recursion, so a state nested 10**5 levels deep costs no stack.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from ..errors import UnsupportedObjectError

DICT, ODICT, LIST, TUPLE = "dict", "odict", "list", "tuple"
CONTAINERS: dict[type, str] = {dict: DICT, collections.OrderedDict: ODICT, list: LIST, tuple: TUPLE}

_EXIT = object()


def typename(obj: Any) -> str:
    t = type(obj)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


# A path is linked (parent, piece) pairs, rendered only for an error message:
# a piece is (KEY, k) for dict key k itself, (ITEM, k) for the value at k,
# (INDEX, i) for a sequence item, or META for ``_metadata``.
KEY, ITEM, INDEX, META = range(4)


def _shown(v: Any) -> str:
    try:
        text = repr(v)
    except ValueError:          # an int past Python's int-to-str limit
        return f"<int of {v.bit_length()} bits>"
    return text if len(text) <= 80 else text[:77] + "..."


def render_path(path: tuple) -> str:
    """``state["model"]["w"][0]`` for a path of linked (parent, piece) pairs."""
    parts = []
    while path:
        path, (tag, v) = path
        if tag == KEY:
            parts.append(f"<key {_shown(v)}>")
        elif tag == ITEM:
            parts.append(key_piece(v))
        elif tag == INDEX:
            parts.append(f"[{v}]")
        else:
            parts.append("._metadata")
    return "state" + "".join(reversed(parts))


def key_piece(key: Any) -> str:
    if type(key) is str:
        return '["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return f"[{_shown(key)}]"


def children(obj: Any, kind: str) -> tuple[list[tuple[Any, str]], bool]:
    """([(child, path piece)], whether the last child is ``_metadata``) of a container."""
    if kind in (LIST, TUPLE):
        return [(v, (INDEX, i)) for i, v in enumerate(obj)], False
    out = []
    for k, v in obj.items():
        out.append((k, (KEY, k)))
        out.append((v, (ITEM, k)))
    meta = getattr(obj, "_metadata", None) if kind == ODICT else None
    if meta is not None:
        out.append((meta, (META, None)))
        return out, True
    return out, False


def walk(root: Any, enter: Callable, leave: Callable | None = None, *,
         kinds: Callable[[Any], str | None] | None = None) -> None:
    """Visit every value of ``root`` depth first, parents before children.

    ``enter(obj, kind, path, parent, slot)`` is called for each value, with
    ``kind`` the container kind or None for a leaf, and ``parent`` whatever
    ``enter`` returned for the container it sits in (None for the root),
    ``slot`` its position among that container's children. For containers,
    ``enter`` returns a token, and ``leave(token, has_meta)`` is called
    once all its children have been entered. ``kinds(obj)`` overrides which
    values count as containers (default: exactly the four types).
    """
    containers = CONTAINERS
    stack: list = [(root, (), None, 0)]
    open_ids: set[int] = set()
    while stack:
        item = stack.pop()
        obj = item[0]
        if obj is _EXIT:
            open_ids.discard(item[1])
            if leave is not None:
                leave(item[2], item[3])
            continue
        _, path, parent, slot = item
        kind = containers.get(type(obj)) if kinds is None else kinds(obj)
        token = enter(obj, kind, path, parent, slot)
        if kind is None:
            continue
        if id(obj) in open_ids:
            raise UnsupportedObjectError(
                f"{render_path(path)}: {typename(obj)} contains itself; a checkpoint must be a tree, not a cycle")
        kids, has_meta = children(obj, kind)
        open_ids.add(id(obj))
        stack.append((_EXIT, id(obj), token, has_meta))
        for i in range(len(kids) - 1, -1, -1):
            child, piece = kids[i]
            stack.append((child, (path, piece), token, i))


def transform(root: Any, leaf: Callable[[Any], Any], *, as_dict: tuple[type, ...] = (),
              copy: bool = False) -> Any:
    """``root`` rebuilt with every leaf ``v`` replaced by ``leaf(v)``.

    With ``copy``, every container is new (the caller may change the
    originals meanwhile). Without, a container whose children all come back
    as the very same objects is returned itself, so nothing is copied that
    need not be. Instances of ``as_dict`` (dict subclasses) always become
    plain dicts of their items. ``_metadata`` goes to a rebuilt OrderedDict.
    """
    def kinds(o: Any) -> str | None:
        kind = CONTAINERS.get(type(o))
        if kind is None and as_dict and isinstance(o, as_dict):
            return DICT
        return kind

    result: list = [None]

    def enter(obj, kind, path, parent, slot):
        target = result if parent is None else parent[2]
        index = 0 if parent is None else slot
        if kind is None:
            target[index] = leaf(obj)
            return None
        originals = [c for c, _ in children(obj, kind)[0]]
        return (obj, kind, [None] * len(originals), originals, target, index)

    def leave(token, has_meta):
        obj, kind, kids, originals, target, index = token
        if not copy and type(obj) in CONTAINERS and all(a is b for a, b in zip(kids, originals)):
            target[index] = obj
            return
        values = kids[:-1] if has_meta else kids
        if kind == LIST:
            target[index] = values
        elif kind == TUPLE:
            target[index] = tuple(values)
        else:
            pairs = zip(values[0::2], values[1::2])
            out = collections.OrderedDict(pairs) if kind == ODICT else dict(pairs)
            if has_meta:
                out._metadata = kids[-1]
            target[index] = out

    walk(root, enter, leave, kinds=kinds)
    return result[0]
