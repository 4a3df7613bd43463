# Sourced by scripts/container-build and scripts/container-test: make the image for linux/amd64
# and/or linux/arm64 from the lock, with no compiler in the image and no package index during the
# build, and gather the images under one manifest list localhost/acusight-gateway:<version>.
#
# The sourcing script defines unavailable() (what to do when this machine cannot do it: skip or
# fail) before calling these functions, and sets ARCHES (e.g. "amd64 arm64").
#
# Environment:
#   GATEWAY_CONTAINER_INSTALL=0     never apt-get install podman, runc, mmdebstrap, qemu
#   GATEWAY_CONTAINER_BASE=IMAGE    base image for every architecture (e.g. a multi-arch
#                                   python:3.11-slim-bookworm); default: one Debian base per
#                                   architecture made with mmdebstrap on first use and kept
#                                   (localhost/gateway-base, localhost/gateway-base-arm64)
#   GATEWAY_CONTAINER_STATE=DIR     where containers.conf lives (default ~/.cache/acusight-gateway)
#   GATEWAY_VENV=DIR                the project's virtualenv (pip, hadolint), made or reused here
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"  # ROOT, VENV
ensure_venv "test"
STATE="${GATEWAY_CONTAINER_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/acusight-gateway}"
LOCK="$ROOT/requirements.txt"
REPO="localhost/acusight-gateway"
MIRROR="${GATEWAY_CONTAINER_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${GATEWAY_CONTAINER_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PY_VERSION="3.11"  # the lock's Python (scripts/lock) and bookworm's python3
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
MANIFEST="$REPO:$VERSION"

T0=$(date +%s.%N)
phase_start=$T0
timings=()
say() { printf 'container: %s\n' "$*"; }
fail() { printf 'container: FAIL: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
phase_done() {  # record how long the phase since the last call took
  local took; took=$(elapsed "$phase_start")
  timings+=("$(printf '%-34s %7ss' "$1" "$took")")
  say "$1: ${took}s"
  phase_start=$(date +%s.%N)
}
print_timings() {
  [ ${#timings[@]} -eq 0 ] && return
  say "timings:"
  printf '  %s\n' "${timings[@]}"
  printf '  %-34s %7ss\n' "total" "$(elapsed "$T0")"
}

host_arch() { case "$(uname -m)" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac; }
machine_of() { case "$1" in amd64) echo x86_64 ;; arm64) echo aarch64 ;; *) fail "unknown architecture $1" ;; esac; }
base_of() {
  if [ -n "${GATEWAY_CONTAINER_BASE:-}" ]; then echo "$GATEWAY_CONTAINER_BASE"
  elif [ "$1" = amd64 ]; then echo "localhost/gateway-base"
  else echo "localhost/gateway-base-$1"; fi
}
image_of() { echo "$REPO:$VERSION-$1"; }
emulated() { [ "$1" != "$(host_arch)" ]; }
# limit ARCH WHAT: seconds allowed. Emulated (qemu) runs are 10-20x slower, more on a machine
# shared with other work: their own limits, against hangs (a slow stop still fails: no SIGKILL).
limit() {
  local native emulated_s
  case "$2" in
    build) native=900; emulated_s=3000 ;;
    healthy) native=30; emulated_s=600 ;;   # from `podman run` to /api/health answering
    command) native=60; emulated_s=600 ;;   # one CLI command inside the container
    stop) native=10; emulated_s=60 ;;       # a clean stop: about 1 s natively with tini
    *) fail "limit: unknown $2" ;;
  esac
  if emulated "$1"; then echo "$emulated_s"; else echo "$native"; fi
}

# -- tools -------------------------------------------------------------------------------------
ensure_tools() {
  local wanted=(podman runc curl) missing=() pkgs=() arch
  [ -z "${GATEWAY_CONTAINER_BASE:-}" ] && wanted+=(mmdebstrap)
  for arch in $ARCHES; do
    emulated "$arch" && wanted+=("qemu-$(machine_of "$arch")-static" update-binfmts)
  done
  local tool
  for tool in "${wanted[@]}"; do
    command -v "$tool" >/dev/null && continue
    missing+=("$tool")
    case "$tool" in
      qemu-*-static) pkgs+=(qemu-user-static) ;;
      update-binfmts) pkgs+=(binfmt-support) ;;
      *) pkgs+=("$tool") ;;
    esac
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "${GATEWAY_CONTAINER_INSTALL:-1}" = "0" ]; then
    unavailable "missing ${missing[*]} and GATEWAY_CONTAINER_INSTALL=0 forbids installing them"
  fi
  say "installing ${pkgs[*]} with apt-get"
  if ! "$ROOT/scripts/apt-install" --with-recommends "${pkgs[@]}"; then
    unavailable "apt-get could not install ${pkgs[*]}"
  fi
  phase_done "install tools"
}

configure_podman() {
  # NOTES.md: podman's default runtime refuses to start containers here (hybrid cgroups, and an
  # open-files limit above this sandbox's 20000); runc with these limits works.
  mkdir -p "$STATE"
  cat >"$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF="$STATE/containers.conf"
  local out
  if ! out=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1); then
    unavailable "podman info failed: $(tail -n 1 <<<"$out")"
  fi
}

# Foreign binaries run through qemu-user-static, registered with the kernel's binfmt_misc
# ("F" flag: the interpreter is opened at registration, so it works inside containers too).
ensure_emulation() {
  local arch="$1" machine
  emulated "$arch" || return 0
  machine=$(machine_of "$arch")
  local binfmt=/proc/sys/fs/binfmt_misc
  if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
      || unavailable "no binfmt_misc here (cannot mount $binfmt): $arch binaries cannot be emulated"
  fi
  if [ ! -e "$binfmt/qemu-$machine" ]; then
    update-binfmts --enable "qemu-$machine" >/dev/null 2>&1 \
      || unavailable "binfmt_misc refuses to register qemu-$machine: $arch binaries cannot be emulated"
  fi
  grep -q '^enabled' "$binfmt/qemu-$machine" 2>/dev/null \
    || unavailable "qemu-$machine is registered but disabled in binfmt_misc"
}

ensure_base() {
  local arch="$1" base
  base=$(base_of "$arch")
  if podman image exists "$base" \
      && [ "$(podman image inspect --format '{{.Architecture}}' "$base")" = "$arch" ]; then
    say "$arch: base image $base: cached"
  elif [ -z "${GATEWAY_CONTAINER_BASE:-}" ]; then
    local log="$STATE/mmdebstrap-$arch.log"
    say "$arch: making base image $base with mmdebstrap (amd64 ~30 s, arm64 ~100 s; log: $log)"
    # python3-venv brings ensurepip, which the Containerfile's build stage uses.
    if ! timeout 900 mmdebstrap --arch="$arch" --variant=minbase \
        --include=python3,python3-venv,tini,ca-certificates bookworm - \
        "deb $MIRROR bookworm main" \
        "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY_MIRROR bookworm-security main" \
        2>"$log" </dev/null | podman import --arch "$arch" - "$base" >>"$log" 2>&1; then
      tail -n 5 "$log" >&2
      podman rmi -f "$base" >/dev/null 2>&1 || true
      unavailable "could not make a $arch base image with mmdebstrap (log: $log)"
    fi
    phase_done "$arch: base image (mmdebstrap)"
  elif ! podman pull -q --arch "$arch" "$base" >/dev/null 2>&1; then
    unavailable "base image $base for $arch is not here and cannot be pulled"
  fi
  # Can podman run this architecture with a published port here? (What the checks need; a
  # failure after this point is the image's fault, not the machine's.)
  local out
  if ! out=$(podman run --rm --pull=never --arch "$arch" -p 127.0.0.1::8080 "$base" \
      python3 -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())' 2>&1); then
    unavailable "podman cannot run a $arch container here: $(tail -n 1 <<<"$out")"
  fi
  local got; got=$(tail -n 1 <<<"$out")
  [ "$got" = "$PY_VERSION $(machine_of "$arch")" ] \
    || fail "$arch: $base runs Python/machine '$got', the lock needs '$PY_VERSION $(machine_of "$arch")'"
  phase_done "$arch: podman runs the base"
}

# -- wheels from the lock ------------------------------------------------------------------------
# Every manylinux tag bookworm's glibc (2.36) accepts: with only the oldest one pip could not take
# a locked release whose wheels carry a newer tag (NOTES.md), and would fail on the hashes.
platform_args() {
  local machine; machine=$(machine_of "$1")
  printf -- '--platform\nmanylinux2014_%s\n' "$machine"
  local minor
  for minor in $(seq 17 36); do printf -- '--platform\nmanylinux_2_%s_%s\n' "$minor" "$machine"; done
}

# The project's own wheel (pure Python, the same for every architecture), built once.
project_wheel() {
  local dest="$WORK/project"
  [ -d "$dest" ] && return 0
  timeout 300 "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
      -w "$dest" "$ROOT" >"$WORK/pip-wheel.log" 2>&1 \
    || { tail -n 20 "$WORK/pip-wheel.log" >&2; fail "pip wheel of the project failed"; }
}

# wheelhouse ARCH: the locked wheels for linux/ARCH (binary only, hash-checked), the project's
# wheel and the lock itself, in $WORK/ARCH/wheelhouse ($WORK/ARCH is the build context).
wheelhouse() {
  local arch="$1" dir="$WORK/$1/wheelhouse"
  # A platform_machine marker would be judged for this host, not for the target.
  ! grep -q 'platform_machine' "$LOCK" || fail "requirements.txt has platform_machine markers: pip download cannot judge them for $arch"
  project_wheel
  mkdir -p "$dir"
  local args; mapfile -t args < <(platform_args "$arch")
  timeout 900 "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
      --only-binary=:all: "${args[@]}" --python-version "$PY_VERSION" --implementation cp \
      --require-hashes -r "$LOCK" -d "$dir" >"$WORK/pip-download-$arch.log" 2>&1 \
    || { tail -n 20 "$WORK/pip-download-$arch.log" >&2; fail "pip download of the lock's $arch wheels failed"; }
  cp "$WORK"/project/*.whl "$dir/"
  cp "$LOCK" "$dir/requirements.txt"
  say "$arch: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sm "$dir" | cut -f1) MB"
  phase_done "$arch: wheels from the lock"
}

# name==version of every wheel in a wheelhouse, one a line, sorted.
wheel_versions() {
  find "$1" -name '*.whl' -printf '%f\n' | awk -F- '{ print tolower($1) "==" $2 }' | sort
}

# The same releases for every architecture: only the files (platform tags) may differ.
compare_wheelhouses() {
  local first="" arch
  for arch in $ARCHES; do
    if [ -z "$first" ]; then first=$arch; continue; fi
    if ! diff <(wheel_versions "$WORK/$first/wheelhouse") <(wheel_versions "$WORK/$arch/wheelhouse") \
        >"$WORK/wheel-diff.txt"; then
      cat "$WORK/wheel-diff.txt" >&2
      fail "the $first and $arch wheelhouses hold different releases"
    fi
    say "wheels for $first and $arch: the same $(wheel_versions "$WORK/$arch/wheelhouse" | wc -l) releases"
  done
  local arch_specific
  for arch in $ARCHES; do
    arch_specific=$(find "$WORK/$arch/wheelhouse" -name "*$(machine_of "$arch")*.whl" -printf '%f\n' | sort | tr '\n' ' ')
    say "$arch: platform wheels: $arch_specific"
  done
}

# -- build -------------------------------------------------------------------------------------
build_image() {
  local arch="$1" image old_id new_id
  image=$(image_of "$arch")
  old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  # The context is the wheelhouse alone: the Containerfile needs nothing else.
  timeout "$(limit "$arch" build)" podman build --layers=false --format docker --pull=never --arch "$arch" \
      --build-arg "BASE_IMAGE=$(base_of "$arch")" -f "$ROOT/Containerfile" \
      -t "$image" "$WORK/$arch" >"$WORK/build-$arch.log" 2>&1 \
    || { tail -n 30 "$WORK/build-$arch.log" >&2; fail "podman build for $arch failed"; }
  new_id=$(podman image inspect --format '{{.Id}}' "$image")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true  # our previous build, now untagged
  fi
  local built_arch
  built_arch=$(podman image inspect --format '{{.Architecture}}' "$image")
  [ "$built_arch" = "$arch" ] || fail "$image was built for $built_arch, not $arch"
  say "$arch: image $image: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
  phase_done "$arch: podman build"
}

# One manifest list naming every architecture's image, made anew from the per-architecture tags
# in local storage: those this run built and any an earlier run built (scripts/container-test
# --arch X runs one architecture at a time).
make_manifest() {
  podman manifest rm "$MANIFEST" >/dev/null 2>&1 || podman rmi "$MANIFEST" >/dev/null 2>&1 || true
  podman manifest create "$MANIFEST" >/dev/null
  local arch
  for arch in amd64 arm64; do
    podman image exists "$(image_of "$arch")" || continue
    podman manifest add --arch "$arch" --os linux "$MANIFEST" "containers-storage:$(image_of "$arch")" >/dev/null
  done
  local listed
  listed=$(podman manifest inspect "$MANIFEST" \
    | "$VENV/bin/python" -c 'import json, sys; print(" ".join(sorted(m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"])))')
  for arch in $ARCHES; do
    grep -qw "$arch" <<<"$listed" || fail "manifest list $MANIFEST lists '$listed', without $arch"
  done
  say "manifest list $MANIFEST: linux/${listed// /, linux/}"
}
