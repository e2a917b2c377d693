"""Response schemas from the Matrix specification's OpenAPI files.

The client-server API is described by one OpenAPI 3.1 file per topic under
data/api/client-server/. Schemas point at each other with relative `$ref`s:
to files in definitions/, to event schemas under data/event-schemas/, to the
application-service and identity definitions, and into their own file with
`#/components/...`. Every file is loaded under its own file:// URI, so all
of these resolve the way they do for the spec's own tooling.

An operation's response schema is reached by a JSON pointer into its file,
which keeps the file as the base URI of any `$ref` inside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parents[2]


def spec_dir() -> Path:
    """The matrix-spec checkout: MATRIX_SPEC_DIR, else ../shared/matrix-spec beside the repo."""
    override = os.environ.get("MATRIX_SPEC_DIR")
    path = Path(override) if override else REPO_ROOT.parent / "shared" / "matrix-spec"
    if not (path / "data" / "api" / "client-server").is_dir():
        raise RuntimeError(f"Matrix spec not found at {path} (set MATRIX_SPEC_DIR)")
    return path.resolve()


def _pointer_token(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _status_key(responses: dict, status: int):
    for key in (str(status), status):
        if key in responses:
            return key
    return None


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps `200:`-style keys and timestamps as plain strings."""


# The spec files quote most keys, but a date-like or number-like scalar must
# never turn into a Python date: JSON Schema only knows JSON types.
_YamlLoader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_YamlLoader)


@dataclass(frozen=True)
class Operation:
    method: str  # upper case
    template: str  # full path, e.g. /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
    file: Path
    pointer: str  # JSON pointer of the operation object inside file
    doc: dict

    def statuses(self) -> list[str]:
        return [str(k) for k in self.doc.get("responses", {})]


FORMAT_CHECKER = jsonschema.FormatChecker()


# Formats defined in data/string-formats.yaml. Only the sigil is checked: the
# grammar of each identifier varies with the room version.
@FORMAT_CHECKER.checks("mx-user-id")
def _user_id(value) -> bool:
    return not isinstance(value, str) or (value.startswith("@") and ":" in value)


@FORMAT_CHECKER.checks("mx-room-id")
def _room_id(value) -> bool:
    return not isinstance(value, str) or value.startswith("!")


@FORMAT_CHECKER.checks("mx-event-id")
def _event_id(value) -> bool:
    return not isinstance(value, str) or value.startswith("$")


@FORMAT_CHECKER.checks("mx-room-alias")
def _room_alias(value) -> bool:
    return not isinstance(value, str) or (value.startswith("#") and ":" in value)


@FORMAT_CHECKER.checks("mx-mxc-uri")
def _mxc(value) -> bool:
    return not isinstance(value, str) or value.startswith("mxc://")


class Spec:
    def __init__(self, root: Path | None = None):
        self.root = root or spec_dir()
        self.api_dir = self.root / "data" / "api" / "client-server"
        self._docs: dict[Path, object] = {}
        self.registry = Registry(retrieve=self._retrieve)
        self.operations: dict[tuple[str, str], Operation] = {}
        for path in sorted(self.api_dir.glob("*.yaml")):
            self._index(path)

    def _doc(self, path: Path):
        path = path.resolve()
        if path not in self._docs:
            self._docs[path] = _load_yaml(path)
        return self._docs[path]

    def _retrieve(self, uri: str) -> Resource:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise LookupError(f"refusing to fetch non-file schema {uri}")
        return Resource.from_contents(self._doc(Path(unquote(parts.path))), default_specification=DRAFT202012)

    def _index(self, path: Path) -> None:
        doc = self._doc(path)
        if not isinstance(doc, dict) or "paths" not in doc:
            return
        base = ""
        for server in doc.get("servers", []):
            base = server.get("variables", {}).get("basePath", {}).get("default", base)
        for route, item in doc["paths"].items():
            for method, op in item.items():
                if method.lower() not in {"get", "put", "post", "delete", "patch", "head", "options"}:
                    continue
                template = base + route
                pointer = "/paths/" + _pointer_token(route) + "/" + method
                self.operations[(method.upper(), template)] = Operation(method.upper(), template, path, pointer, op)

    def operation(self, method: str, template: str) -> Operation:
        try:
            return self.operations[(method.upper(), template)]
        except KeyError:
            raise KeyError(f"no operation {method} {template} in the spec") from None

    def response_schema_ref(self, method: str, template: str, status: int) -> str | None:
        """A `$ref` URI to the JSON schema of the response, or None if the spec gives none."""
        op = self.operation(method, template)
        responses = op.doc.get("responses", {})
        key = _status_key(responses, status)
        if key is None:
            raise KeyError(f"spec lists no {status} response for {method} {template}")
        content = responses[key].get("content", {})
        media = next((m for m in content if m.startswith("application/json")), None)
        if media is None or "schema" not in content[media]:
            return None
        pointer = "/".join(
            [op.pointer, "responses", _pointer_token(str(key)), "content", _pointer_token(media), "schema"]
        )
        return op.file.as_uri() + "#" + quote(pointer, safe="/~")

    def validator_for_ref(self, ref: str) -> jsonschema.protocols.Validator:
        return jsonschema.Draft202012Validator({"$ref": ref}, registry=self.registry, format_checker=FORMAT_CHECKER)

    def error_schema_ref(self) -> str:
        return (self.api_dir / "definitions" / "errors" / "error.yaml").as_uri()

    def validate_response(self, method: str, template: str, status: int, body) -> None:
        """Raise jsonschema.ValidationError (with every error) if `body` breaks the schema.

        Some error responses in the spec carry only a description; their body
        is then checked against the standard error schema every client-server
        error follows.
        """
        ref = self.response_schema_ref(method, template, status)
        if ref is None:
            if status < 400:
                raise KeyError(f"spec gives no JSON schema for {status} of {method} {template}")
            ref = self.error_schema_ref()
        errors = sorted(self.validator_for_ref(ref).iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
            raise jsonschema.ValidationError(
                f"{method} {template} {status}: {len(errors)} schema error(s):\n  " + "\n  ".join(lines)
            )

    def event_schema(self, event_type: str) -> dict | None:
        path = self.root / "data" / "event-schemas" / "schema" / f"{event_type}.yaml"
        return self._doc(path) if path.exists() else None

    def validate_event_content(self, event_type: str, content) -> None:
        """Validate an event's content against the `content` schema of its event type."""
        path = self.root / "data" / "event-schemas" / "schema" / f"{event_type}.yaml"
        if not path.exists():
            raise KeyError(f"no event schema for {event_type}")
        validator = self.validator_for_ref(path.as_uri() + "#/properties/content")
        errors = list(validator.iter_errors(content))
        if errors:
            lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
            raise jsonschema.ValidationError(f"{event_type} content: schema errors:\n  " + "\n  ".join(lines))
