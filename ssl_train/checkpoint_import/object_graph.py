"""Object paths of a TF2 checkpoint's variables, from its ``TrackableObjectGraph``.

A TF2 checkpoint (``tf.train.Checkpoint``, and a SavedModel's ``variables/``) keys each
tensor by *one* path through the objects that were saved, chosen breadth-first: the
official SimCLR SavedModels hold the same variables under ``model/resnet_model/...`` and
under a flat ``trainable_variables_list/N``, and the shorter flat key is what the index
says. The graph itself, stored as the string tensor ``_CHECKPOINTABLE_OBJECT_GRAPH``,
records every path, so the importer maps variables by their place in the model
whichever key TensorFlow picked. Decoded by hand like the index (``.wire``).

Field numbers: tensorflow/core/protobuf/trackable_object_graph.proto.
"""

from __future__ import annotations

from collections.abc import Iterator

from .wire import WireError, parse_fields

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"
_MAX_PATHS = 200_000  # a guard against a hostile graph's path explosion


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise WireError("expected a string field")
    return value.decode("utf-8")


def _messages(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if any(not isinstance(v, bytes) for v in values):
        raise WireError(f"field {number} is not a message")
    return values  # type: ignore[return-value]


def parse_object_graph(data: bytes) -> list[tuple[list[tuple[str, int]], dict[str, str]]]:
    """Nodes of a serialized ``TrackableObjectGraph``: per node its children as
    (local name, node id) and its saved attributes as name -> checkpoint key.

    Example:
        >>> child = b"\\x08\\x01\\x12\\x05model"  # ObjectReference(node_id=1, local_name="model")
        >>> attr = b"\\x0a\\x0eVARIABLE_VALUE\\x1a\\x03key"
        >>> graph = b"\\x0a" + bytes([len(child) + 2, 0x0A, len(child)]) + child + b"\\x0a" + bytes([len(attr) + 2, 0x12, len(attr)]) + attr
        >>> parse_object_graph(graph)
        [([('model', 1)], {}), ([], {'VARIABLE_VALUE': 'key'})]
    """
    nodes = []
    for node in _messages(parse_fields(data), 1):
        fields = parse_fields(node)
        children = []
        for reference in _messages(fields, 1):
            ref = parse_fields(reference)
            node_id = ref.get(1, [0])[-1]
            if not isinstance(node_id, int):
                raise WireError("child reference without a node id")
            children.append((_text(ref.get(2, [b""])[-1]), node_id))
        attributes = {}
        for tensor in _messages(fields, 2):
            serialized = parse_fields(tensor)
            name = _text(serialized.get(1, [b""])[-1])
            attributes[name] = _text(serialized.get(3, [b""])[-1])
        nodes.append((children, attributes))
    for children, _ in nodes:
        if any(not 0 <= node_id < len(nodes) for _, node_id in children):
            raise WireError("a child reference names a node the graph does not have")
    return nodes


def variable_paths(data: bytes) -> Iterator[tuple[str, str]]:
    """(object path, checkpoint key) for every path from the root to every variable.

    A variable reachable two ways appears twice, once per path; a cycle is not followed.

    Example:
        >>> list(variable_paths(b""))
        []
    """
    nodes = parse_object_graph(data)
    if not nodes:
        return
    found = 0
    stack: list[tuple[int, tuple[str, ...], frozenset[int]]] = [(0, (), frozenset([0]))]
    while stack:
        node_id, path, on_path = stack.pop()
        children, attributes = nodes[node_id]
        if VARIABLE_VALUE in attributes and path:
            found += 1
            if found > _MAX_PATHS:
                raise WireError(f"the object graph has more than {_MAX_PATHS} variable paths")
            yield "/".join(path), attributes[VARIABLE_VALUE]
        for name, child in reversed(children):
            if child not in on_path:
                stack.append((child, (*path, name), on_path | {child}))
