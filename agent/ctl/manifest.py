"""``NodeUpgradeJob`` manifests: the one parsing gate of the controller.

A manifest is read as KubeEdge's admission webhook and controller would read
it (``cloud/pkg/admissioncontroller/admit_nodeupgradejob.go``,
``pkg/util/validation``): a ``v``-prefixed semantic version, an image that is a
repository with a ``/`` and no tag or digest (the version picks the tag), and
one of ``nodeNames`` or ``labelSelector``. KubeEdge's webhook refuses a
manifest with both, yet the seed lecture's example has both and KubeEdge's
controller takes ``nodeNames`` then: so do we, with a warning. Defaults are the
CRD's: concurrency 1, timeoutSeconds 300, failureTolerate 0.1.

Past this module every value is frozen and checked; nothing downstream looks
at the YAML again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.config_reader import check_document, show
from agent.errors import AgentError, ManifestError
from agent.versions import Version, check_digest, check_name, parse_image

GROUP = "operations.kubeedge.io"
API_VERSIONS = (f"{GROUP}/v1alpha1", f"{GROUP}/v1alpha2")
MAX_MANIFEST_BYTES = 1 << 20
DEFAULT_TIMEOUT = 300
DEFAULT_TOLERATE = 0.1
CHECK_ITEMS = ("cpu", "mem", "disk")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_SPEC_KEYS = {"version", "timeoutSeconds", "image", "imageDigestGatter", "checkItems",
              "requireConfirmation", "nodeNames", "labelSelector", "concurrency",
              "failureTolerate"}
_V1ALPHA1_ONLY = {"upgradeTool"}  # Era A; "" or keadm


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice: YAML would keep the last one
    silently, and a job's second ``version:`` must not win unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {show(key)} given twice", key_node.start_mark)
            seen.add(key if isinstance(key, (str, int, float, bool)) else id(key_node))
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _StrictLoader.construct_mapping)
TOLERATE_RE = re.compile(r"^(0|1)(\.[0-9]{1,6})?$|^\.[0-9]{1,6}$")


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry (Kubernetes label selector semantics)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: absent keys match


@dataclass(frozen=True)
class Selector:
    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels)
                and all(r.matches(labels) for r in self.expressions))


@dataclass(frozen=True)
class DigestGatherer:
    """``imageDigestGatter`` (sic): one digest, or one per GOARCH."""

    value: str | None = None
    per_arch: tuple[tuple[str, str], ...] = ()

    def for_arch(self, arch: str | None) -> str | None:
        """The digest a node of ``arch`` must pull; raises if the job has none for it."""
        if self.value is not None or not self.per_arch:
            return self.value
        found = dict(self.per_arch).get(arch or "")
        if found is None:
            known = ", ".join(a for a, _ in self.per_arch)
            raise ManifestError(f"imageDigestGatter has no digest for architecture "
                                f"{arch or 'unknown'} (has {known})")
        return found


@dataclass(frozen=True)
class JobSpec:
    name: str
    api_version: str
    version: str
    image: str | None               # a repository; None: the agent's default
    timeout_seconds: int
    node_names: tuple[str, ...]
    selector: Selector | None
    concurrency: int
    failure_tolerate: float
    check_items: tuple[str, ...]
    require_confirmation: bool
    digests: DigestGatherer
    warnings: tuple[str, ...] = ()


def read_manifest(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        raw.decode()
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8") from None
    return raw


def load_manifest(path: Path) -> JobSpec:
    return parse_manifest(read_manifest(path), str(path))


def parse_manifest(raw: bytes, where: str = "manifest") -> JobSpec:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        docs = [d for d in yaml.load_all(raw, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: not YAML: {exc}".splitlines()[0]) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ManifestError(f"{where}: unreadable YAML: nested too deeply") from None
    except ValueError as exc:  # an integer past Python's 4300-digit limit
        raise ManifestError(f"{where}: unreadable YAML: {str(exc)[:120]}") from None
    if len(docs) != 1:
        raise ManifestError(f"{where}: expected one NodeUpgradeJob, found {len(docs)} documents")
    doc = docs[0]
    try:
        check_document(doc)
        return _job(doc)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc.reason}") from None
    except AgentError as exc:  # the agent's own validators (names, versions, images)
        raise ManifestError(f"{where}: {exc.reason}") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be a mapping, not {show(value)}")
    return value


def _typed(obj: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key} must be a {kind.__name__}, not {show(value)}")
    return value


def _strings(obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _typed(obj, key, list, [], where)
    if not all(isinstance(v, str) for v in values):
        raise ManifestError(f"{where}.{key} must be a list of strings")
    return tuple(values)


def _job(doc: Any) -> JobSpec:
    doc = _object(doc, "the document")
    api = doc.get("apiVersion")
    if api not in API_VERSIONS:
        raise ManifestError(f"apiVersion {show(api)} is not one of {', '.join(API_VERSIONS)}")
    if doc.get("kind") != "NodeUpgradeJob":
        raise ManifestError(f"kind {show(doc.get('kind'))} is not NodeUpgradeJob")
    meta = _object(doc.get("metadata"), "metadata")
    name = check_name("metadata.name", _typed(meta, "name", str, "", "metadata"))
    spec = _object(doc.get("spec"), "spec")
    allowed = _SPEC_KEYS | (_V1ALPHA1_ONLY if api.endswith("v1alpha1") else set())
    for key in spec:
        if key not in allowed:
            raise ManifestError(f"spec: unknown field {show(key)} for {api}")
    tool = _typed(spec, "upgradeTool", str, "", "spec")
    if tool.lower() not in ("", "keadm"):
        raise ManifestError(f"spec.upgradeTool {show(tool)}: only keadm is supported")
    if not spec.get("nodeNames") and spec.get("labelSelector") is None:
        raise ManifestError("spec: set nodeNames or labelSelector (neither is set)")
    return JobSpec(
        name=name, api_version=api, version=_version(spec), image=_image(spec),
        timeout_seconds=_timeout(spec), node_names=_node_names(spec),
        selector=_selector(spec.get("labelSelector")),
        concurrency=_concurrency(spec), failure_tolerate=_tolerate(spec),
        check_items=_check_items(spec),
        require_confirmation=_typed(spec, "requireConfirmation", bool, False, "spec"),
        digests=_gatherer(spec.get("imageDigestGatter")),
        warnings=_warnings(spec),
    )


def _version(spec: dict[str, Any]) -> str:
    text = _typed(spec, "version", str, "", "spec")
    if not text:
        # KubeEdge silently does nothing here (kubeedge#6170): say so instead.
        raise ManifestError("spec.version is required")
    return str(Version.parse(text))


def _image(spec: dict[str, Any]) -> str | None:
    text = _typed(spec, "image", str, "", "spec")
    if not text:
        return None
    ref = parse_image(text)
    if ref.tag or ref.digest:
        raise ManifestError(f"spec.image {show(text)} must be a repository without a tag or "
                            "digest: spec.version picks the tag, imageDigestGatter the digest")
    if "/" not in ref.repo:
        raise ManifestError(f"spec.image {show(text)} must name a repository with a '/' "
                            "(e.g. kubeedge/installation-package)")
    return ref.repo


def _timeout(spec: dict[str, Any]) -> int:
    value = _typed(spec, "timeoutSeconds", int, 0, "spec")
    if not 0 <= value <= 86400:
        raise ManifestError(f"spec.timeoutSeconds {value} is out of range 0..86400")
    return value or DEFAULT_TIMEOUT  # 0 means the default, as in KubeEdge


def _node_names(spec: dict[str, Any]) -> tuple[str, ...]:
    names = _strings(spec, "nodeNames", "spec")
    for n in names:
        check_name("node name", n)
    return tuple(dict.fromkeys(names))  # a node named twice is upgraded once


def _selector(raw: Any) -> Selector | None:
    if raw is None:
        return None
    sel = _object(raw, "spec.labelSelector")
    for key in sel:
        if key not in ("matchLabels", "matchExpressions"):
            raise ManifestError(f"spec.labelSelector: unknown field {show(key)}")
    labels = _object(sel.get("matchLabels") or {}, "spec.labelSelector.matchLabels")
    pairs = []
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ManifestError(f"spec.labelSelector.matchLabels: {show(k)}: {show(v)} "
                                "must be a string: string (quote numbers and empty values)")
        pairs.append((k, v))
    exprs = []
    raw_exprs = sel.get("matchExpressions") or []
    if not isinstance(raw_exprs, list):
        raise ManifestError("spec.labelSelector.matchExpressions must be a list")
    for i, item in enumerate(raw_exprs):
        where = f"spec.labelSelector.matchExpressions[{i}]"
        expr = _object(item, where)
        label, op = expr.get("key"), expr.get("operator")
        values = _strings(expr, "values", where)
        if not isinstance(label, str) or not label:
            raise ManifestError(f"{where}.key must be a non-empty string")
        if op not in OPERATORS:
            raise ManifestError(f"{where}.operator {show(op)} is not one of "
                                f"{', '.join(OPERATORS)}")
        if op in ("In", "NotIn") and not values:
            raise ManifestError(f"{where}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise ManifestError(f"{where}: operator {op} takes no values")
        exprs.append(Requirement(label, op, values))
    return Selector(tuple(pairs), tuple(exprs))


def _concurrency(spec: dict[str, Any]) -> int:
    value = _typed(spec, "concurrency", int, 0, "spec")
    if not 0 <= value <= 100_000:
        raise ManifestError(f"spec.concurrency {value} is out of range 0..100000")
    return value or 1


def _tolerate(spec: dict[str, Any]) -> float:
    raw = spec.get("failureTolerate")
    if raw is None or raw == "":
        return DEFAULT_TOLERATE
    if not isinstance(raw, str):
        # The CRD types it as a string; a bare 0.1 is what people write anyway.
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ManifestError(f"spec.failureTolerate must be a string like \"0.1\", "
                                f"not {show(raw)}")
        raw = str(raw)
    # ASCII decimals only: float() would also take "0.1\u0660", " 1e-1" or "nan".
    if not TOLERATE_RE.fullmatch(raw) or not 0 <= (value := float(raw)) <= 1:
        raise ManifestError(f"spec.failureTolerate {show(raw)} must be a decimal between "
                            "0 and 1, like \"0.1\"")
    return value


def _check_items(spec: dict[str, Any]) -> tuple[str, ...]:
    items = _strings(spec, "checkItems", "spec")
    for item in items:
        if item not in CHECK_ITEMS:
            raise ManifestError(f"spec.checkItems: unknown item {show(item)} "
                                f"(known: {', '.join(CHECK_ITEMS)})")
    return tuple(dict.fromkeys(items))


def _gatherer(raw: Any) -> DigestGatherer:
    if raw is None:
        return DigestGatherer()
    g = _object(raw, "spec.imageDigestGatter")
    for key in g:
        if key not in ("value", "amd64", "arm64", "registryAPI"):
            raise ManifestError(f"spec.imageDigestGatter: unknown field {show(key)}")
    if g.get("registryAPI") is not None:
        raise ManifestError("spec.imageDigestGatter.registryAPI is implemented nowhere in "
                            "KubeEdge; give the digests")
    where = "spec.imageDigestGatter"
    value = _typed(g, "value", str, "", where) or None
    per_arch = tuple((a, check_digest(d)) for a in ("amd64", "arm64")
                     if (d := _typed(g, a, str, "", where)))
    if value is not None and per_arch:
        raise ManifestError("spec.imageDigestGatter gives both value and per-arch digests")
    return DigestGatherer(check_digest(value) if value is not None else None, per_arch)


def _warnings(spec: dict[str, Any]) -> tuple[str, ...]:
    out = []
    if spec.get("nodeNames") and spec.get("labelSelector") is not None:
        out.append("both nodeNames and labelSelector are set: KubeEdge's webhook refuses "
                   "this; as KubeEdge's controller does, nodeNames win and labelSelector "
                   "is ignored")
    return tuple(out)
