#!/usr/bin/env bash
# Install (or upgrade in place) edge-upgrade-agent as a systemd service.
#
#   scripts/install.sh [--wheelhouse DIR] [--node-name NAME]
#                      [--broker HOST:PORT --ca FILE --cert FILE --key FILE]
#                      [--prefix DIR] [--no-start] [--root DIR]
#
# What it does, in order (every step is safe to repeat):
#   0. With --wheelhouse DIR (a bundle from scripts/build-wheelhouse.sh): its
#      SHA256SUMS is verified and its bundle.json must name this host's
#      architecture (uname -m: x86_64 = amd64, aarch64 = arm64) and the
#      Python minor the venv will have; otherwise it is refused (exit 1)
#      before anything is created. (An older bundle, without bundle.json, is
#      taken with a warning only if every wheel's tags fit this host.)
#   1. <prefix>/venv (default /opt/edge-upgrade-agent/venv): created with
#      `python3 -m venv` if missing or broken, otherwise reused.
#   2. The agent goes into it: from this source tree (pip builds it; needs
#      PyPI or a mirror for its dependencies), or with --wheelhouse DIR
#      completely offline from a bundle made by scripts/build-wheelhouse.sh.
#   3. systemd/edge-upgrade-agent.service -> /etc/systemd/system/ (replaced
#      on every run; keep local changes in a drop-in).
#   4. /etc/edge-upgrade-agent/agent.yaml from config/agent.yaml, with
#      node_name and, with --broker, transport mqtt + the TLS files copied to
#      /etc/edge-upgrade-agent/tls/ (key 0600). ONLY if no agent.yaml exists:
#      an operator's configuration is never overwritten.
#   5. `edge-upgrade-agent config validate` on the config the service will use.
#   6. systemctl daemon-reload, enable --now (or restart, so an upgrade takes
#      effect), unless --no-start, --root, or systemd is not PID 1.
#
# --root DIR puts every system path under DIR and implies --no-start; it is
# for tests (a venv is not relocatable: the one under DIR only works there).
#
# Environment: PYTHON (default python3, >= 3.10 with the venv module).
# Exit status: 0 installed; 1 failed; 2 bad usage.
set -euo pipefail

UNIT_NAME=edge-upgrade-agent.service
DEFAULT_PREFIX=/opt/edge-upgrade-agent
# The TLS paths the sample config already names (transport.mqtt.*_file).
TLS_DIR=/etc/edge-upgrade-agent/tls

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/copy-source.sh
. "$repo/scripts/copy-source.sh"
PYTHON=${PYTHON:-python3}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}
bad_usage() {
    printf 'install.sh: %s (see --help)\n' "$*" >&2
    exit 2
}
say() {
    printf 'install.sh: %s\n' "$*"
}

# -- arguments ---------------------------------------------------------------
wheelhouse='' node_name='' node_name_given='' broker='' ca='' cert='' key=''
prefix=$DEFAULT_PREFIX no_start='' root=''
need_arg() {
    [ "$2" -ge 2 ] || bad_usage "$1 needs a value"
}
while [ $# -gt 0 ]; do
    case $1 in
        --wheelhouse) need_arg "$1" $#; wheelhouse=$2; shift 2 ;;
        --node-name) need_arg "$1" $#; node_name=$2; node_name_given=1; shift 2 ;;
        --broker) need_arg "$1" $#; broker=$2; shift 2 ;;
        --ca) need_arg "$1" $#; ca=$2; shift 2 ;;
        --cert) need_arg "$1" $#; cert=$2; shift 2 ;;
        --key) need_arg "$1" $#; key=$2; shift 2 ;;
        --prefix) need_arg "$1" $#; prefix=$2; shift 2 ;;
        --root) need_arg "$1" $#; root=$2; shift 2 ;;
        --no-start) no_start=1; shift ;;
        -h | --help) usage ;;
        *) bad_usage "unknown argument: $1" ;;
    esac
done

# Everything is checked before anything is touched.
case $prefix in
    /*) ;;
    *) bad_usage "--prefix must be an absolute path: $prefix" ;;
esac
# Characters that need no quoting in a unit's ExecStart= (no spaces, no %).
if [[ ! $prefix =~ ^(/[A-Za-z0-9._+-]+)+$ ]] || [[ $prefix =~ (^|/)\.\.?(/|$) ]]; then
    bad_usage "--prefix must be a plain absolute path (letters, digits, . _ + -): $prefix"
fi
prefix=${prefix%/}

if [ -n "$node_name" ]; then
    # DNS-1123 subdomain, as KubeEdge (and the agent's config check) wants it.
    if [ ${#node_name} -gt 253 ] || [[ ! $node_name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$ ]]; then
        bad_usage "--node-name must be a lowercase DNS-1123 name: $node_name"
    fi
fi

broker_host='' broker_port=''
if [ -n "$broker" ]; then
    if [[ $broker =~ ^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$ ]]; then      # [IPv6]:port
        broker_host=${BASH_REMATCH[1]} broker_port=${BASH_REMATCH[2]}
    elif [[ $broker =~ ^([A-Za-z0-9][A-Za-z0-9.-]*):([0-9]+)$ ]]; then  # name or IPv4
        broker_host=${BASH_REMATCH[1]} broker_port=${BASH_REMATCH[2]}
    else
        bad_usage "--broker must be HOST:PORT (or [IPv6]:PORT): $broker"
    fi
    if [ ${#broker_port} -gt 5 ] || [ "$((10#$broker_port))" -lt 1 ] || [ "$((10#$broker_port))" -gt 65535 ]; then
        bad_usage "--broker port out of range: $broker_port"
    fi
    broker_port=$((10#$broker_port))
    if [ -z "$ca" ] || [ -z "$cert" ] || [ -z "$key" ]; then
        bad_usage "--broker needs --ca, --cert and --key (mutual TLS)"
    fi
elif [ -n "$ca$cert$key" ]; then
    bad_usage "--ca, --cert and --key go with --broker"
fi
for f in "$ca" "$cert" "$key"; do
    [ -z "$f" ] || [ -f "$f" ] || bad_usage "no such file: $f"
done

if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || bad_usage "--wheelhouse: no such directory: $wheelhouse"
    wheelhouse=$(cd -- "$wheelhouse" && pwd)
    compgen -G "$wheelhouse/edge_upgrade_agent-*.whl" >/dev/null \
        || bad_usage "--wheelhouse $wheelhouse holds no edge_upgrade_agent wheel (scripts/build-wheelhouse.sh makes one)"
fi

R=  # prefix of every system path; empty on a real install
if [ -n "$root" ]; then
    # Resolved, not yet created: that waits until every check has passed.
    R=$(realpath -m -- "$root")
    [ "$R" != / ] || R=
    no_start=1
elif [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --root DIR for a test install)"
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.10 (set PYTHON=/path/to/python3)"

if [ -z "$node_name" ]; then
    node_name=$(uname -n | tr '[:upper:]' '[:lower:]')
    if [[ ! $node_name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$ ]]; then
        bad_usage "the host name '$node_name' is not a DNS-1123 name; pass --node-name"
    fi
    [ -e "$R/etc/edge-upgrade-agent/agent.yaml" ] \
        || say "node_name: the host name '$node_name' (--node-name sets another)"
fi

venv=$R$prefix/venv
agent=$venv/bin/edge-upgrade-agent
confdir=$R/etc/edge-upgrade-agent
conf=$confdir/agent.yaml
unit_dst=$R/etc/systemd/system/$UNIT_NAME

venv_usable() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

# -- 0. the bundle: checked before anything is touched -------------------------
# Its SHA256SUMS first (nothing in a damaged copy, bundle.json included, can
# be trusted), then its bundle.json against this host: `uname -m` as
# amd64/arm64, and the minor version of the Python pip will install for (the
# venv's if step 1 reuses it, else $PYTHON). Then every wheel's file name
# tags, which is what pip would otherwise find out half-way through.
#
# A bundle without bundle.json comes from build-wheelhouse.sh before it took
# --arch/--python: it was built natively, so its wheels' tags say what it is
# for. It is accepted, with a warning, only if every wheel fits this host
# (refusing would make every site rebuild a working bundle for nothing; the
# tag check refuses the ones that would fail).
check_bundle() { # DIR
    local py=$PYTHON machine host_arch
    ! venv_usable || py=$venv/bin/python
    machine=$(uname -m)
    case $machine in
        x86_64) host_arch=amd64 ;;
        aarch64 | arm64) host_arch=arm64 machine=aarch64 ;;
        *) host_arch=$machine ;;
    esac
    "$py" - "$1" "$host_arch" "$machine" <<'PY'
import hashlib, json, re, struct, sys
from pathlib import Path

d, host_arch, machine = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
minor = sys.version_info[1]
host_py = f"3.{minor}"
if struct.calcsize("P") == 4 and machine in ("x86_64", "aarch64"):
    # A 32-bit userland on a 64-bit kernel (e.g. Raspberry Pi OS armhf).
    host_arch, machine = {"x86_64": ("i386", "i686"), "aarch64": ("armhf", "armv7l")}[machine]
if host_arch in ("amd64", "arm64"):
    hint = f"build one with scripts/build-wheelhouse.sh --arch {host_arch} --python {host_py}"
else:
    hint = ("scripts/build-wheelhouse.sh builds for amd64 and arm64 only: "
            "install from the source tree (without --wheelhouse)")

def refuse(msg):
    sys.exit(f"install.sh: error: {d}: {msg}")

sums = d / "SHA256SUMS"
if not sums.is_file():
    refuse("no SHA256SUMS: not a complete bundle from scripts/build-wheelhouse.sh; " + hint)
listed = {}
for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
    m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *]([^/\\]+)", line)
    if not m:
        refuse(f"SHA256SUMS line {n} is not '<sha256>  <file name>': {line[:80]!r}")
    listed[m.group(2)] = m.group(1).lower()
unlisted = sorted(p.name for p in d.glob("*.whl") if p.name not in listed)
if unlisted:
    refuse(f"not in SHA256SUMS, so not part of the bundle: {', '.join(unlisted)}")
missing = sorted(name for name in listed if not (d / name).is_file())
if missing:
    refuse(f"listed in SHA256SUMS but missing (incomplete copy?): {', '.join(missing)}")
bad = []
for name, want in sorted(listed.items()):
    h = hashlib.sha256()
    with open(d / name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        bad.append(name)
if bad:
    refuse(f"SHA256SUMS does not match {', '.join(bad)} (damaged or altered copy): "
           "copy the bundle again and check it with: sha256sum -c SHA256SUMS")

manifest = d / "bundle.json"
if manifest.is_file():
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        arch, py = str(meta["arch"]), str(meta["python"])
    except (ValueError, KeyError, TypeError) as e:
        refuse(f"bundle.json is not a build-wheelhouse.sh manifest ({e!r}); " + hint)
    if (arch, py) != (host_arch, host_py):
        refuse(f"this bundle is for {arch} / Python {py}; "
               f"this host is {host_arch} / Python {host_py}: {hint}")
    what = f"{arch} / Python {py}, agent {meta.get('agent_version', '?')}"
else:
    what = f"no bundle.json (an older bundle), wheels for {host_arch} / Python {host_py}"

def fits(name):
    """Whether pip on this host can install the wheel, by its file name tags."""
    parts = name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return False
    pys, abis, plats = (set(t.split(".")) for t in parts[-3:])
    if "any" not in plats and not any(
            p.startswith(("manylinux", "linux_")) and p.endswith("_" + machine) for p in plats):
        return False
    for t in pys:
        m = re.fullmatch(r"(py|cp)3(\d*)", t)
        if not m:
            continue
        impl, x = m.group(1), int(m.group(2) or -1)
        if impl == "py" and x <= minor and "none" in abis:
            return True
        if impl == "cp" and 0 <= x <= minor and "abi3" in abis:
            return True
        if impl == "cp" and x == minor and abis & {f"cp3{minor}", "none"}:
            return True
    return False

wheels = sorted(p.name for p in d.glob("*.whl"))
unfit = [w for w in wheels if not fits(w)]
if unfit:
    if manifest.is_file():
        refuse(f"bundle.json says {arch} / Python {py}, but these wheels are not for it: "
               f"{', '.join(unfit)}; " + hint)
    refuse(f"an older bundle (no bundle.json) whose wheels are not all for {host_arch} / "
           f"Python {host_py} ({', '.join(unfit)}): " + hint)
if not manifest.is_file():
    print(f"install.sh: WARNING: {d} has no bundle.json (built before build-wheelhouse.sh "
          f"took --arch/--python); accepted as every wheel fits this host ({hint})",
          file=sys.stderr)
print(f"install.sh: bundle {d}: {what}, {len(wheels)} wheels, SHA256SUMS verified")
PY
}
if [ -n "$wheelhouse" ]; then
    check_bundle "$wheelhouse" || exit 1
fi
[ -z "$R" ] || mkdir -p -- "$R"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 022

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

# -- 1. the venv -------------------------------------------------------------
if venv_usable; then
    say "reusing $venv"
else
    # Missing, or broken (e.g. the system python it pointed to was replaced).
    rm -rf -- "$venv"
    mkdir -p -- "$(dirname "$venv")"
    "$PYTHON" -m venv "$venv" \
        || die "cannot create $venv (Debian/Ubuntu: apt-get install python3-venv)"
    say "created $venv"
fi

# -- 2. the agent ------------------------------------------------------------
pip=("$venv/bin/python" -m pip --quiet)
if [ -n "$wheelhouse" ]; then
    # Offline: nothing but the bundle. --upgrade picks the newest agent in it
    # and whatever dependency versions it needs; the second call reinstalls
    # the agent itself even when its version number did not change.
    "${pip[@]}" install --no-index --find-links "$wheelhouse" --upgrade edge-upgrade-agent \
        || die "pip could not install from $wheelhouse (built for another Python or CPU?)"
    "${pip[@]}" install --no-index --find-links "$wheelhouse" --force-reinstall --no-deps \
        edge-upgrade-agent || die "pip could not reinstall the agent from $wheelhouse"
else
    # From this tree, via a copy: pip's in-tree build would leave build/ and
    # *.egg-info behind in the source tree (which may be read-only).
    mkdir "$tmp/src"
    copy_source "$repo" "$tmp/src"
    # A local directory is always rebuilt and reinstalled, same version or not.
    "${pip[@]}" install --upgrade "$tmp/src" \
        || die "pip could not install from $repo (offline? use --wheelhouse)"
fi
version=$("$agent" --version) || die "$agent does not run"
say "installed $version into $venv"

# -- 3. the unit -------------------------------------------------------------
unit_src=$repo/systemd/$UNIT_NAME
unit_text=$(<"$unit_src")
default_exec=$DEFAULT_PREFIX/venv/bin/edge-upgrade-agent
[[ $unit_text == *"ExecStart=$default_exec "* ]] || die "$unit_src: ExecStart is not $default_exec"
unit_text=${unit_text//"$default_exec"/"$prefix/venv/bin/edge-upgrade-agent"}
mkdir -p -- "$(dirname "$unit_dst")"
printf '%s\n' "$unit_text" >"$unit_dst.tmp"
chmod 0644 "$unit_dst.tmp"
mv -f -- "$unit_dst.tmp" "$unit_dst"
say "installed $unit_dst"

# -- 4. the configuration ----------------------------------------------------
install -d -m 0750 "$confdir"
# For LoadCredential=registry:... in the unit (see the comment there).
install -d -m 0700 "$confdir/credentials"

# Edits the documented sample line by line (comments stay) and checks the
# result by parsing it. Values arrive as argv, never as code; all are quoted
# as YAML strings except the port.
write_config() { # OUT NODE HOST PORT CERT
    "$venv/bin/python" - "$repo/config/agent.yaml" "$@" <<'PY'
import json, re, sys
import yaml

sample, out, node, host, port, cert = sys.argv[1:]
text = open(sample, encoding="utf-8").read()

def sub(pattern, value):
    global text
    text, n = re.subn(pattern, lambda m: m.group(1) + value, text, count=0, flags=re.M)
    if n != 1:
        sys.exit(f"install.sh: {sample}: expected one line matching {pattern!r}, found {n}")

sub(r"^(node_name:[ \t]*)[^ \t\n#]+", json.dumps(node))
if host:
    sub(r"^(  kind:[ \t]*)spool\b", "mqtt")
    sub(r"^(    host:[ \t]*)[^ \t\n#]+", json.dumps(host))
    sub(r"^(    port:[ \t]*)[0-9]+", port)

data = yaml.safe_load(text)
t = data.get("transport", {})
assert data["node_name"] == node, data["node_name"]
if host:
    m = t.get("mqtt", {})
    assert t["kind"] == "mqtt" and m["host"] == host and m["port"] == int(port), t
    tls = "/etc/edge-upgrade-agent/tls/"
    for k, name in (("ca_file", "ca.crt"), ("cert_file", "node.crt"), ("key_file", "node.key")):
        assert m.get(k, tls + name) == tls + name, f"transport.mqtt.{k} is not {tls + name}"
if cert:
    # The broker's ACL knows the node by the certificate's CN (config/agent.yaml).
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    with open(cert, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    cns = [a.value for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [node]:
        print(f"install.sh: WARNING: the certificate's CN is {cns} but node_name is {node!r}; "
              "the broker will not let this node use its topics", file=sys.stderr)
with open(out, "w", encoding="utf-8") as f:
    f.write(text)
PY
}

# With --root the TLS files and trusted keys sit under the root, but the
# config (rightly) names their real paths: check a copy that points there.
validation_copy() { # CONFIG OUT
    "$venv/bin/python" - "$1" "$2" "$R" <<'PY'
import sys
import yaml

src, out, root = sys.argv[1:]
data = yaml.safe_load(open(src, encoding="utf-8")) or {}
mqtt = data.setdefault("transport", {}).setdefault("mqtt", {})
defaults = {"ca_file": "/etc/edge-upgrade-agent/tls/ca.crt",
            "cert_file": "/etc/edge-upgrade-agent/tls/node.crt",
            "key_file": "/etc/edge-upgrade-agent/tls/node.key"}
for k, d in defaults.items():
    mqtt[k] = root + mqtt.get(k, d)
sec = data.setdefault("security", {})
sec["trusted_keys_dir"] = root + sec.get("trusted_keys_dir", "/etc/edge-upgrade-agent/trusted-keys")
with open(out, "w", encoding="utf-8") as f:
    yaml.safe_dump(data, f)
PY
}

validate() { # CONFIG
    local target=$1
    if [ -n "$R" ]; then
        validation_copy "$1" "$tmp/validate.yaml"
        target=$tmp/validate.yaml
    fi
    "$agent" config validate "$target" >"$tmp/validate.out" 2>&1 || {
        cat "$tmp/validate.out" >&2
        die "the configuration $1 does not validate (see above)"
    }
    say "config validate: $1 is valid${R:+ (checked with its TLS paths under --root)}"
}

if [ -e "$conf" ]; then
    say "kept the existing $conf (never overwritten)"
    ignored=()
    [ -z "$node_name_given" ] || ignored+=(--node-name)
    [ -z "$broker" ] || ignored+=(--broker --ca --cert --key)
    [ ${#ignored[@]} -eq 0 ] \
        || say "note: not applied, as the config exists: ${ignored[*]}; edit $conf (and $R$TLS_DIR) by hand"
    validate "$conf"
else
    if [ -n "$broker" ]; then
        install -d -m 0700 "$R$TLS_DIR"
        install -m 0644 -- "$ca" "$R$TLS_DIR/ca.crt"
        install -m 0644 -- "$cert" "$R$TLS_DIR/node.crt"
        install -m 0600 -- "$key" "$R$TLS_DIR/node.key"
        say "copied the TLS files to $R$TLS_DIR"
    fi
    write_config "$conf.new" "$node_name" "$broker_host" "$broker_port" "$cert"
    chmod 0640 "$conf.new"
    validate "$conf.new"
    mv -f -- "$conf.new" "$conf"
    transport=spool
    [ -z "$broker" ] || transport="mqtt to $broker"
    say "wrote $conf (node_name $node_name, transport $transport)"
fi

# -- 5. the service ----------------------------------------------------------
start_hint() {
    say "to start it on the target host:"
    printf '    systemctl daemon-reload\n    systemctl enable --now %s\n' "$UNIT_NAME"
    printf '    systemctl status %s; journalctl -u %s -f\n' "$UNIT_NAME" "$UNIT_NAME"
}
if [ -n "$no_start" ]; then
    say "not starting the service (--no-start${root:+ / --root})"
    start_hint
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    say "systemd is not running as PID 1 here: installed, not started"
    start_hint
    exit 0
fi

systemctl daemon-reload
if systemctl is-active --quiet "$UNIT_NAME"; then
    # An upgrade takes effect only on restart. A restart in the middle of a
    # job is safe (recovery resumes or rolls back) but needless: skip it then.
    busy=$("$agent" --config /etc/edge-upgrade-agent/agent.yaml --output json status 2>/dev/null \
        | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin).get("lockHeld"))' \
        2>/dev/null) || busy=unknown
    systemctl enable --quiet "$UNIT_NAME"
    if [ "$busy" = True ]; then
        say "a job is running: NOT restarting; run 'systemctl restart $UNIT_NAME' once it is done"
        exit 0
    fi
    systemctl restart "$UNIT_NAME" \
        || die "restart failed; see: journalctl -u $UNIT_NAME -n 50"
    say "restarted $UNIT_NAME ($version)"
else
    systemctl enable --now "$UNIT_NAME" \
        || die "start failed; see: journalctl -u $UNIT_NAME -n 50"
    say "enabled and started $UNIT_NAME ($version)"
fi
