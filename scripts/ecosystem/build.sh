#!/usr/bin/env bash
# Builds the pinned upstream programs (scripts/ecosystem/versions.json) from the Go module proxy, with
# -trimpath, into a cache directory outside the repository:
#   $CBT_CSI_ECOSYSTEM_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/cbt-csi-ecosystem)/<component>-<version>/bin/
# A component already built there is reused; nothing depends on the cache existing.
# Components build in groups (group.mjs): a component with `buildWith` builds with its host, all of them in
# one throwaway module that requires each at its pinned version, with one `go build`, so the packages they
# share compile once. Local (./, ../) replace lines of their go.mod are pinned to released versions
# (Kubernetes' staging modules to v0.X.Y). The log lists each version a group raises above a member's own
# go.mod; a group that would lower one fails.
# A component with a `source` is a program of this repository (its own go.mod and go.sum pin what it
# requires); it is rebuilt when its sources change (source-hash.mjs).
#
# Usage: scripts/ecosystem/build.sh [component ...]   (default: what CI's tests use, see DEFAULT below)
#        (a component named builds its whole group)
#        ECOSYSTEM_BUILD_JOBS=N   groups built at once (default 2)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
versions="$here/versions.json"
cache="${CBT_CSI_ECOSYSTEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbt-csi-ecosystem}"
jobs="${ECOSYSTEM_BUILD_JOBS:-2}"
# The longest group first (kubernetes with etcd), the others fill the second slot beside it; our client
# last, after the sidecars' group, so the packages it shares with them at the same versions are cached.
# The sidecars and snapshot-controller are for the headless cluster (test/ecosystem/headless-cluster.test.ts).
DEFAULT=(kubernetes etcd helm external-resizer external-snapshotter external-provisioner csi-sanity external-snapshot-metadata snapshot-metadata-client)

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

# A program of this repository: built from its own module directory, with its committed go.sum, into OUT.
build_local() {
  local name="$1" out="$2" ldflags="$3" source
  source="$(field "$name" source)"
  cd "$repo/$source"
  while read -r bin pkg; do
    go build -mod=readonly -trimpath -ldflags="$ldflags" -o "$out/$bin" "$pkg"
  done < <(field "$name" binaries)
}

# The directory a component's programs land in (what test/ecosystem/tools.ts reads).
dir_of() { echo "$cache/$1-$(field "$1" version)"; }

# The default file name `go build -o DIR/` gives a main package: its last element, or the one before a
# major version suffix (go.etcd.io/etcd/server/v3 -> server).
default_name() {
  local pkg="$1" last
  last="${pkg##*/}"
  if [[ "$last" =~ ^v[0-9]+$ ]]; then pkg="${pkg%/*}"; last="${pkg##*/}"; fi
  echo "$last"
}

# Builds a group (scripts/ecosystem/group.mjs): the host component and every component built with it, in
# one throwaway module that requires each at its pinned version, with one `go build` of all their
# programs, so what they share compiles once. A group is reused only if every member was built from
# these very versions.json entries (same members, packages, flags, replaces).
build_group() {
  local host="$1" spec members=() m dir work start status
  m="$(node "$here/group.mjs" members "$host")" # not in <(...): there a failure would go unnoticed
  mapfile -t members <<<"$m"
  if [ "$(field "$host" buildable)" = "false" ]; then
    echo "$host $(field "$host" version): not built ($(field "$host" why))"
    return 0
  fi
  spec="$(node "$here/group.mjs" spec "$host")"
  [ -z "$(field "$host" source)" ] || spec="$spec
source-sha256 $(node "$here/source-hash.mjs" "$repo/$(field "$host" source)")"
  local reused=1
  for m in "${members[@]}"; do
    dir="$(dir_of "$m")"
    { [ -f "$dir/complete" ] && [ "$(cat "$dir/spec.json" 2>/dev/null)" = "$spec" ]; } || reused=0
  done
  if [ "$reused" = 1 ]; then
    for m in "${members[@]}"; do echo "$m $(field "$m" version): reused $(dir_of "$m")/bin"; done
    return 0
  fi
  start=$SECONDS
  for m in "${members[@]}"; do rm -rf "$(dir_of "$m")"; done
  dir="$(dir_of "$host")"
  work="$dir/module"
  mkdir -p "$work/out"
  # Not inside `||`: there bash ignores set -e, and a failed step would go unnoticed.
  set +e
  (
    set -euo pipefail
    if [ -n "$(field "$host" source)" ]; then
      build_local "$host" "$work/out" "-s -w $(field "$host" ldflags)"
      exit 0
    fi
    cd "$work"
    go mod init "cbt-csi-ecosystem/$host" >/dev/null 2>&1
    gomods=""
    for m in "${members[@]}"; do
      module="$(field "$m" module)"
      version="$(field "$m" version)"
      go mod edit -require="$module@$version"
      download="$(go mod download -json "$module@$version")" || { echo "$download"; exit 1; }
      gomods+="$m $(node -pe 'JSON.parse(process.argv[1]).GoMod' "$download")"$'\n'
    done
    printf '%s' "$gomods" | node "$here/group.mjs" replaces "$host" | xargs -r go mod edit
    pkgs=()
    ldflags=()
    for m in "${members[@]}"; do
      while read -r bin pkg; do
        pkgs+=("$pkg")
        ldflags+=("-ldflags=$pkg=-s -w $(field "$m" ldflags)")
      done < <(field "$m" binaries)
    done
    args=()
    for m in "${members[@]}"; do
      while read -r bin pkg; do args+=("$pkg@$(field "$m" version)"); done < <(field "$m" binaries)
    done
    go get "${args[@]}"
    # What the group changes against each member's own go.mod (a group never lowers a pin).
    GROUP_LIST="$(go list -m -f '{{.Path}} {{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' all)" \
      node "$here/group.mjs" changes "$host" <<<"$gomods" >changes.txt
    echo "versions that differ from a member's own go.mod: $(wc -l <changes.txt)"
    cat changes.txt
    go build -trimpath "${ldflags[@]}" -o out/ "${pkgs[@]}"
  ) >"$dir.log" 2>&1
  status=$?
  set -e
  if [ "$status" -ne 0 ]; then
    echo "${members[*]}: BUILD FAILED after $((SECONDS - start)) s; last lines of $dir.log:" >&2
    tail -20 "$dir.log" >&2
    return 1
  fi
  for m in "${members[@]}"; do
    mdir="$(dir_of "$m")"
    mkdir -p "$mdir/bin"
    while read -r bin pkg; do
      built="$bin"
      [ -n "$(field "$m" source)" ] || built="$(default_name "$pkg")"
      mv "$work/out/$built" "$mdir/bin/$bin"
    done < <(field "$m" binaries)
    cp "$dir.log" "$mdir/build.log"
    [ ! -f "$work/changes.txt" ] || grep "^$m: " "$work/changes.txt" >"$mdir/changes.txt" || true
    printf '%s\n' "$spec" >"$mdir/spec.json"
  done
  rm -rf "$work" "$dir.log"
  for m in "${members[@]}"; do
    printf '%s %s built with %s in %d s with %s\n' "$m" "$(field "$m" version)" "${members[*]}" "$((SECONDS - start))" \
      "$(go version)" >"$(dir_of "$m")/complete"
  done
  echo "${members[*]}: built in $((SECONDS - start)) s -> $cache"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=("${DEFAULT[@]}")
hosts="$(node "$here/group.mjs" hosts "${components[@]}")"
mapfile -t hosts <<<"$hosts"
total=$SECONDS
failed=0
running=0
for host in "${hosts[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  build_group "$host" &
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
