#!/usr/bin/env bash
# Builds the pinned upstream programs (scripts/ecosystem/versions.json) from the Go module proxy, with
# -trimpath, into a cache directory outside the repository:
#   $CBT_CSI_ECOSYSTEM_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/cbt-csi-ecosystem)/<component>-<version>/bin/
# A component already built there is reused; nothing depends on the cache existing.
# Each component builds in a throwaway module that requires it at its pinned version; local (./, ../)
# replace lines of its go.mod are pinned to released versions (Kubernetes' staging modules to v0.X.Y).
# A component with a `source` is a program of this repository (its own go.mod and go.sum pin what it
# requires); it is rebuilt when its sources change (source-hash.mjs).
#
# Usage: scripts/ecosystem/build.sh [component ...]   (default: what CI's tests use, see DEFAULT below)
#        ECOSYSTEM_BUILD_JOBS=N   components built at once (default 2)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
versions="$here/versions.json"
cache="${CBT_CSI_ECOSYSTEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbt-csi-ecosystem}"
jobs="${ECOSYSTEM_BUILD_JOBS:-2}"
# The longest build first, so the others fill the second slot beside it. The sidecars and snapshot-controller
# are for the headless cluster (test/ecosystem/headless-cluster.test.ts).
DEFAULT=(kubernetes helm external-snapshotter external-provisioner external-resizer etcd csi-sanity external-snapshot-metadata snapshot-metadata-client)

export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
mkdir -p "$cache"

# One field of a component, as shell-safe text.
field() {
  node -e '
    const [file, name, key] = process.argv.slice(1);
    const c = JSON.parse(require("fs").readFileSync(file, "utf8")).components[name];
    if (!c) { console.error(`unknown component ${name}`); process.exit(2); }
    const v = c[key];
    if (key === "spec") console.log(JSON.stringify(c));
    else if (key === "binaries") for (const [bin, pkg] of Object.entries(v ?? {})) console.log(`${bin} ${pkg}`);
    else console.log(String(v ?? "").replaceAll("{version}", c.version));
  ' "$versions" "$1" "$2"
}

# What a finished build records and is reused for: the versions.json entry, and for a program of this
# repository also the hash of its sources.
spec_of() {
  local source
  field "$1" spec
  source="$(field "$1" source)"
  [ -z "$source" ] || echo "source-sha256 $(node "$here/source-hash.mjs" "$repo/$source")"
}

# A program of this repository: built from its own module directory, with its committed go.sum.
build_local() {
  local name="$1" dir="$2" ldflags="$3" source
  source="$(field "$name" source)"
  cd "$repo/$source"
  while read -r bin pkg; do
    go build -mod=readonly -trimpath -ldflags="$ldflags" -o "$dir/bin/$bin" "$pkg"
  done < <(field "$name" binaries)
}

build_one() {
  local name="$1" module version local_version ldflags dir work bin start
  module="$(field "$name" module)"
  version="$(field "$name" version)"
  local_version="$(field "$name" localVersion)"
  local_version="${local_version:-$version}"
  ldflags="-s -w $(field "$name" ldflags)"
  dir="$cache/$name-$version"
  if [ "$(field "$name" buildable)" = "false" ]; then
    echo "$name $version: not built ($(field "$name" why))"
    return 0
  fi
  # Reused only if built from this very entry of versions.json (same packages, flags, replaces).
  if [ -f "$dir/complete" ] && [ "$(cat "$dir/spec.json" 2>/dev/null)" = "$(spec_of "$name")" ]; then
    echo "$name $version: reused $dir/bin"
    return 0
  fi
  start=$SECONDS
  rm -rf "$dir"
  work="$dir/module"
  mkdir -p "$work" "$dir/bin"
  # Not inside `||`: there bash ignores set -e, and a failed step would go unnoticed.
  set +e
  (
    set -euo pipefail
    if [ -n "$(field "$name" source)" ]; then
      build_local "$name" "$dir" "$ldflags"
      exit 0
    fi
    cd "$work"
    go mod init "cbt-csi-ecosystem/$name" >/dev/null 2>&1
    go mod edit -require="$module@$version"
    download="$(go mod download -json "$module@$version")" || { echo "$download"; exit 1; }
    upstream_gomod="$(node -pe 'JSON.parse(process.argv[1]).GoMod' "$download")"
    # Replace lines of the upstream go.mod: versioned ones as they are; local ones (to a directory of the
    # same repository) pinned to the release, for modules upstream requires.
    go mod edit -json "$upstream_gomod" | node -e '
      const m = JSON.parse(require("fs").readFileSync(0, "utf8"));
      const required = new Set((m.Require ?? []).map((r) => r.Path));
      for (const r of m.Replace ?? []) {
        if (r.New.Version) console.log(`-replace=${r.Old.Path}=${r.New.Path}@${r.New.Version}`);
        else if (required.has(r.Old.Path)) console.log(`-replace=${r.Old.Path}=${r.Old.Path}@${process.argv[1]}`);
      }
    ' "$local_version" | xargs -r go mod edit
    pkgs=()
    while read -r bin pkg; do pkgs+=("$pkg@$version"); done < <(field "$name" binaries)
    go get "${pkgs[@]}"
    while read -r bin pkg; do
      go build -trimpath -ldflags="$ldflags" -o "$dir/bin/$bin" "$pkg"
    done < <(field "$name" binaries)
  ) >"$dir/build.log" 2>&1
  local status=$?
  set -e
  if [ "$status" -ne 0 ]; then
    echo "$name $version: BUILD FAILED after $((SECONDS - start)) s; last lines of $dir/build.log:" >&2
    tail -20 "$dir/build.log" >&2
    return 1
  fi
  rm -rf "$work"
  spec_of "$name" >"$dir/spec.json"
  printf '%s %s built in %d s with %s\n' "$name" "$version" "$((SECONDS - start))" "$(go version)" >"$dir/complete"
  echo "$name $version: built in $((SECONDS - start)) s -> $dir/bin"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=("${DEFAULT[@]}")
total=$SECONDS
failed=0
running=0
for name in "${components[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  build_one "$name" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
# The CRD modules the tests read from the Go module cache (they run with GOPROXY=off).
while read -r mod; do
  (cd "$cache" && go mod download "$mod") || { echo "CRD module $mod: download failed" >&2; failed=1; }
done < <(node -e '
  const c = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).components;
  for (const v of Object.values(c)) if (v.crds) console.log(`${v.crds.module}@${v.crds.version}`);
' "$versions")
echo "ecosystem build: ${components[*]} in $((SECONDS - total)) s (cache $cache)"
exit "$failed"
