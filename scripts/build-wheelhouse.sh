#!/usr/bin/env bash
# Build offline bundles for air-gapped sites: binary wheels of the agent and
# of every dependency, for `scripts/install.sh --wheelhouse BUNDLE_DIR`.
#
#   scripts/build-wheelhouse.sh [--arch amd64|arm64]... [--python 3.X]... [--out DIR]
#   scripts/build-wheelhouse.sh [--arch amd64|arm64] [--python 3.X] BUNDLE_DIR
#
# One bundle per (architecture, Python minor) pair: --arch and --python may
# both be repeated (--arch also takes x86_64 and aarch64). Defaults: this
# machine's architecture (uname -m) and the minor version of $PYTHON
# (python3). Each bundle is a directory
#   DIR/wheelhouse-<arch>-py<python>/      e.g. dist/wheelhouse-arm64-py3.11/
# (DIR defaults to dist/ in this source tree). The second form writes a
# single bundle into BUNDLE_DIR itself. A bundle holds:
#   *.whl          the agent's own (pure) wheel and one binary wheel of each
#                  runtime dependency ([project] dependencies in
#                  pyproject.toml, and theirs) for that arch and Python
#   bundle.json    {"arch", "python", "agent_version", "created", "wheels",
#                  "platforms"}: install.sh refuses a bundle made for another
#                  architecture or Python minor
#   SHA256SUMS     of every wheel and bundle.json; check the copy on site:
#                  (cd BUNDLE_DIR && sha256sum -c SHA256SUMS)
# Rebuilding replaces the wheels, bundle.json and SHA256SUMS of a bundle
# directory (only once the new bundle is complete); other files are left.
# One line on stdout per bundle built:
#   build-wheelhouse.sh: N wheels for arm64 / Python 3.11 in /abs/path/of/bundle
#
# Any architecture can be built on any machine (an arm64 bundle on amd64):
# wheels come from `pip download --only-binary=:all: --platform ...`, never
# compiled here, for glibc Linux (manylinux up to glibc 2.28: Debian 10+,
# Ubuntu 20.04+, RHEL 8+). Needs PyPI (or a mirror configured for pip); pip
# runs from a temporary venv, so neither the caller's environment nor this
# source tree is changed (pip builds the agent from a copy of the tree).
#
# Environment: PYTHON (default python3, >= 3.10), PIP_* (pip's own settings,
# e.g. PIP_INDEX_URL, PIP_CACHE_DIR). Exit status: 0 built; 1 failed; 2 bad usage.
set -euo pipefail

# manylinux_2_28: the newest glibc a bundle's wheels may need. pip takes the
# best wheel among the manylinux tags up to it (and py3-none-any), so a
# release built only for a newer glibc is passed over for an older one that
# still runs on the oldest supported host.
GLIBC_MAX=28

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
bad_usage() {
    printf 'build-wheelhouse.sh: %s (see --help)\n' "$*" >&2
    exit 2
}
die() {
    printf 'build-wheelhouse.sh: error: %s\n' "$*" >&2
    exit 1
}
# amd64 / arm64, from Debian's (and KubeEdge's) or the kernel's name.
arch_name() {
    case $1 in
        amd64 | x86_64) echo amd64 ;;
        arm64 | aarch64) echo arm64 ;;
        *) return 1 ;;
    esac
}

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

archs=() pythons=() out_parent='' bundle_dir=''
need_arg() {
    [ "$2" -ge 2 ] || bad_usage "$1 needs a value"
}
add_unique() { # ARRAY VALUE
    local -n arr=$1
    local v
    for v in ${arr[@]+"${arr[@]}"}; do
        [ "$v" != "$2" ] || return 0
    done
    arr+=("$2")
}
while [ $# -gt 0 ]; do
    case $1 in
        --arch)
            need_arg "$1" $#
            a=$(arch_name "$2") || bad_usage "--arch must be amd64 or arm64: $2"
            add_unique archs "$a"; shift 2 ;;
        --python)
            need_arg "$1" $#
            [[ $2 =~ ^3\.(0|[1-9][0-9]*)$ ]] || bad_usage "--python must be a minor version like 3.11: $2"
            add_unique pythons "$2"; shift 2 ;;
        --out) need_arg "$1" $#; out_parent=$2; shift 2 ;;
        -h | --help) usage ;;
        -*) bad_usage "unknown option: $1" ;;
        *)
            [ -z "$bundle_dir" ] || bad_usage "only one BUNDLE_DIR"
            bundle_dir=$1; shift ;;
    esac
done
[ -z "$bundle_dir" ] || [ -z "$out_parent" ] || bad_usage "give --out DIR or BUNDLE_DIR, not both"

if [ ${#archs[@]} -eq 0 ]; then
    a=$(arch_name "$(uname -m)") \
        || bad_usage "this machine is $(uname -m): choose the bundle's --arch (amd64 or arm64)"
    archs=("$a")
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.10 (set PYTHON=/path/to/python3)"
if [ ${#pythons[@]} -eq 0 ]; then
    pythons=("$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
fi
if [ -n "$bundle_dir" ] && [ $((${#archs[@]} * ${#pythons[@]})) -ne 1 ]; then
    bad_usage "BUNDLE_DIR takes one bundle; for several --arch/--python use --out DIR"
fi

# shellcheck source=scripts/copy-source.sh
. "$repo/scripts/copy-source.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$PYTHON" -m venv "$tmp/venv" || die "cannot create a venv with $PYTHON (Debian: apt-get install python3-venv)"
pip=("$tmp/venv/bin/python" -m pip --quiet)

# The agent's own wheel: pure Python, the same in every bundle.
mkdir "$tmp/src" "$tmp/agent"
copy_source "$repo" "$tmp/src"
"${pip[@]}" wheel --no-deps --wheel-dir "$tmp/agent" "$tmp/src" \
    || die "pip could not build the agent's wheel (needs PyPI or a mirror for setuptools)"
agent_whl=$(compgen -G "$tmp/agent/edge_upgrade_agent-*-py3-none-any.whl") \
    || die "pip built no pure edge_upgrade_agent wheel: $(ls "$tmp/agent")"
# Its version, and the oldest Python it allows (Requires-Python: >=3.N).
read -r agent_version min_minor < <("$PYTHON" - "$agent_whl" <<'PY'
import re, sys, zipfile
from email.parser import HeaderParser

with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
    meta = HeaderParser().parsestr(z.read(name).decode("utf-8"))
m = re.fullmatch(r"\s*>=\s*3\.(\d+)\s*", meta.get("Requires-Python") or "")
print(meta["Version"], m.group(1) if m else 0)
PY
) || die "cannot read the metadata of $agent_whl"

for py in "${pythons[@]}"; do
    [ "${py#3.}" -ge "$min_minor" ] \
        || bad_usage "--python $py: the agent needs Python >= 3.$min_minor"
done

build_bundle() { # ARCH PYTHON DEST
    local arch=$1 py=$2 dest=$3 machine glibc_min platforms=() g stage
    # The oldest manylinux glibc of each: manylinux1 = 2.5; aarch64 wheels
    # start at manylinux2014 = 2.17.
    case $arch in
        amd64) machine=x86_64 glibc_min=5 ;;
        arm64) machine=aarch64 glibc_min=17 ;;
    esac
    # manylinux2014 is pip's spelling of manylinux_2_17; pip also takes
    # manylinux2010/manylinux1 from it for x86_64. py3-none-any wheels
    # (--abi none, platform any) are always accepted with these.
    platforms+=("manylinux2014_$machine")
    for ((g = glibc_min; g <= GLIBC_MAX; g++)); do
        platforms+=("manylinux_2_${g}_$machine")
    done
    stage=$tmp/bundle-$arch-py$py
    mkdir "$stage"
    cp -- "$agent_whl" "$stage/"
    # The agent's wheel as the requirement: pip resolves exactly its
    # Requires-Dist (pyproject.toml's [project] dependencies, so no list
    # here to drift) and their dependencies, for the target's platform.
    "${pip[@]}" download --dest "$stage" --only-binary=:all: \
        "${platforms[@]/#/--platform=}" --python-version "$py" --implementation cp \
        --abi "cp${py/./}" --abi abi3 --abi none "$agent_whl" \
        || die "pip found no complete set of binary wheels for $arch / Python $py (see above)"

    # The manifest, then the checksums of everything (the manifest included).
    "$PYTHON" - "$stage" "$arch" "$py" "$agent_version" "${platforms[@]}" <<'PY' \
        || die "cannot write $stage/bundle.json"
import datetime, json, pathlib, sys

stage, arch, py, version, *platforms = sys.argv[1:]
d = pathlib.Path(stage)
manifest = {
    "arch": arch,
    "python": py,
    "agent_version": version,
    "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "wheels": sorted(p.name for p in d.glob("*.whl")),
    "platforms": platforms + ["any"],
}
(d / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
PY
    (cd "$stage" && sha256sum -- *.whl bundle.json >SHA256SUMS)

    # Only now replace the old bundle's files (stale wheels of an older
    # version would otherwise linger, unlisted).
    mkdir -p -- "$dest"
    rm -f -- "$dest"/*.whl "$dest/bundle.json" "$dest/SHA256SUMS"
    mv -- "$stage"/* "$dest/"
    count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
    echo "build-wheelhouse.sh: $count wheels for $arch / Python $py in $dest"
}

if [ -n "$bundle_dir" ]; then
    mkdir -p -- "$bundle_dir"
    bundle_dir=$(cd -- "$bundle_dir" && pwd)
else
    mkdir -p -- "${out_parent:=$repo/dist}"
    out_parent=$(cd -- "$out_parent" && pwd)
fi
for arch in "${archs[@]}"; do
    for py in "${pythons[@]}"; do
        build_bundle "$arch" "$py" "${bundle_dir:-$out_parent/wheelhouse-$arch-py$py}"
    done
done
