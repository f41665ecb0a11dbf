#!/usr/bin/env bash
# Builds the release and lays it out as a relocatable distribution in OUTDIR:
#
#   bin/kvh                                  the CLI
#   lib/libkvhygiene.so                      the allocator (PyTorch's CUDAPluggableAllocator, C ABI)
#   lib/libkvhygiene_preload.so              the LD_PRELOAD interposers for C++ engines
#   include/kvhygiene.h                      the C header
#   python/                                  the Python helper package (PYTHONPATH=OUTDIR/python)
#   share/doc/kvhygiene/                     README, ARCHITECTURE, docs/, the PyTorch example,
#                                            deploy/ (Dockerfile, Kubernetes manifests, alert
#                                            rules, dashboard), where the docs link to them
#   BUILD-INFO                               version, commit, toolchain, kernel origin, glibc needed
#   MANIFEST                                 sha256 of every other file (sha256sum -c MANIFEST)
#
# Nothing in it refers to the build tree: the libraries have no RPATH and the Python package
# finds the library beside it (lib/), or through KVH_LIBRARY once installed elsewhere. deploy/Dockerfile copies it to /opt/kvhygiene, and
# scripts/check-release.sh checks a distribution (layout, MANIFEST, and that it runs).
#
# The kernels are built as build.rs builds them: with the pinned toolchain in .tools/cuda when
# scripts/install-nvcc.sh has installed it (SASS for sm_80/86/89/90 + PTX), else from the
# committed kernels/scrub.ptx (JIT-compiled by the driver), which is said in a warning and in
# BUILD-INFO. KVHYGIENE_REQUIRE_KERNEL_BUILD=1 makes that fallback an error, as in CI.
#
# The Python package is shipped as its source tree rather than a wheel: building a wheel needs
# setuptools from the network (the package is pure Python either way), and the package finds
# the library beside it or through KVH_LIBRARY, which deploy/Dockerfile sets.
#
# Usage: scripts/build-release.sh [--force] OUTDIR
#        scripts/build-release.sh --list-layout     (the files a distribution holds; no build)
#   --force   OUTDIR may hold an earlier distribution: its files are replaced. Without it a
#             non-empty OUTDIR is refused; with it, OUTDIR must hold an earlier distribution,
#             unchanged, and nothing else: a BUILD-INFO, a well-formed MANIFEST that lists
#             every file under bin/, lib/, include/, python/ and share/, and whose sums still
#             match (sha256sum -c), and no other entry (this script never deletes what it did
#             not write). Leftovers of an interrupted run (a .build-release.XXXXXX directory
#             holding only files a distribution holds) are removed, with or without --force.
#             One run at a time writes an OUTDIR (flock).
# KVHYGIENE_SOURCE_COMMIT names the commit in BUILD-INFO when there is no git checkout (a
# Docker build context has no .git).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prog="scripts/build-release.sh"

usage() {
    echo "usage: $prog [--force] OUTDIR" >&2
    echo "       $prog --list-layout" >&2
}

die() {
    echo "$prog: $*" >&2
    exit 2
}

# The distribution, one "SOURCE DEST" line per file. SOURCE is a path relative to the
# repository root, or @NAME for a build output (resolved from cargo's messages below).
# check-release.sh compares a distribution against this list, so it is the one definition.
layout() {
    echo "@kvh bin/kvh"
    echo "@libkvhygiene lib/libkvhygiene.so"
    echo "@libkvhygiene_preload lib/libkvhygiene_preload.so"
    echo "include/kvhygiene.h include/kvhygiene.h"
    echo "python/pyproject.toml python/pyproject.toml"
    echo "python/setup.py python/setup.py"
    local f
    while IFS= read -r f; do
        echo "$f $f"
    done < <(cd "$root" && find python/kvhygiene -name '*.py' -type f | LC_ALL=C sort)
    for f in README.md ARCHITECTURE.md LICENSE LICENSE-APACHE NOTICE; do
        if [[ -f "$root/$f" ]]; then echo "$f share/doc/kvhygiene/$f"; fi
    done
    while IFS= read -r f; do
        echo "$f share/doc/kvhygiene/$f"
    done < <(cd "$root" && {
        find docs -maxdepth 1 -type f -name '*.md'
        find examples -type f \( -name '*.md' -o -name '*.py' -o -name '*.c' \)
    } | LC_ALL=C sort)
    while IFS= read -r f; do
        echo "$f share/doc/kvhygiene/$f"
    done < <(cd "$root" && find deploy -type f \( -name '*.md' -o -name '*.yaml' -o -name '*.json' -o -name Dockerfile \) | LC_ALL=C sort)
}

force=0
outdir=""
list=0
while (($#)); do
    case "$1" in
        --force) force=1 ;;
        --list-layout) list=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --) shift; break ;;
        -*)
            usage
            die "unknown option '$1'"
            ;;
        *)
            [[ -z "$outdir" ]] || { usage; die "one OUTDIR expected, got '$outdir' and '$1'"; }
            outdir="$1"
            ;;
    esac
    shift
done
if (($#)); then
    [[ -z "$outdir" && $# -eq 1 ]] || { usage; die "one OUTDIR expected"; }
    outdir="$1"
fi

if ((list)); then
    [[ -z "$outdir" ]] || die "--list-layout takes no OUTDIR"
    layout | awk '{print $2}'
    exit 0
fi

[[ -n "$outdir" ]] || { usage; die "missing OUTDIR (the directory to write the distribution into)"; }

# Checked before the build (minutes), so that a bad OUTDIR is said at once.
if [[ -e "$outdir" && ! -d "$outdir" ]]; then
    die "OUTDIR '$outdir' exists and is not a directory"
fi
owned=(bin lib include python share BUILD-INFO MANIFEST)

# The paths a distribution holds.
declare -A layout_set=()
while IFS= read -r p; do layout_set["$p"]=1; done < <(layout | awk '{print $2}' && printf '%s\n' BUILD-INFO MANIFEST)

# Whether $1 is the stage of an interrupted run: a directory named as mktemp names it below,
# holding nothing but files a distribution holds.
is_leftover() {
    local d="$1" path rel
    [[ "$(basename -- "$d")" =~ ^\.build-release\.[A-Za-z0-9]{6}$ && -d "$d" && ! -L "$d" ]] || return 1
    while IFS= read -r -d '' path; do
        rel="${path#"$d"/}"
        [[ "$rel" != *$'\n'* && -n "${layout_set[$rel]:-}" ]] || return 1
    done < <(find "$d" -mindepth 1 ! -type d -print0)
}

# Whether OUTDIR holds anything but leftovers of interrupted runs.
holds_files() {
    local entry
    while IFS= read -r -d '' entry; do
        is_leftover "$entry" || return 0
    done < <(find "$1" -mindepth 1 -maxdepth 1 -print0)
    return 1
}

# Refuses (exit 2) unless everything in OUTDIR is an earlier distribution's, unchanged: top-level
# entries are the distribution's (or leftovers), BUILD-INFO is there, MANIFEST is well formed,
# lists every file, link or other non-directory under the entries, and its sums match. Only
# then may --force delete them. Run before the build and again just before the replacement.
check_replaceable() {
    local dir="$1" entry o known path rel line
    while IFS= read -r -d '' entry; do
        is_leftover "$entry" && continue
        known=0
        for o in "${owned[@]}"; do [[ "$entry" == "$dir/$o" ]] && known=1; done
        ((known)) || die "OUTDIR '$dir' holds '${entry#"$dir"/}', which is not part of a distribution; refusing to write there even with --force"
    done < <(find "$dir" -mindepth 1 -maxdepth 1 -print0)
    for o in MANIFEST BUILD-INFO; do
        [[ -f "$dir/$o" && ! -L "$dir/$o" ]] ||
            die "OUTDIR '$dir' has no $o, so it is not an earlier distribution; refusing to replace anything there even with --force"
    done
    declare -A listed=()
    while IFS= read -r line; do
        [[ "$line" =~ ^[0-9a-f]{64}\ \ (.+)$ ]] ||
            die "OUTDIR '$dir': MANIFEST line '$line' is not 'SHA256  PATH'; refusing to replace anything there even with --force"
        listed["${BASH_REMATCH[1]}"]=1
    done <"$dir/MANIFEST"
    for o in "${owned[@]}"; do
        [[ -e "$dir/$o" || -L "$dir/$o" ]] || continue
        while IFS= read -r -d '' path; do
            rel="${path#"$dir"/}"
            [[ "$rel" != *$'\n'* ]] ||
                die "OUTDIR '$dir' holds a file whose name has a newline; refusing to delete it even with --force"
            [[ "$rel" == BUILD-INFO || "$rel" == MANIFEST ]] && continue
            [[ -n "${listed[$rel]:-}" ]] ||
                die "OUTDIR '$dir' holds '$rel', which its MANIFEST does not list; refusing to delete it even with --force"
        done < <(find "$dir/$o" ! -type d -print0)
    done
    (cd -- "$dir" && sha256sum --check --strict --quiet MANIFEST >/dev/null 2>&1) ||
        die "files of the distribution in OUTDIR '$dir' changed since it was built ('cd $dir && sha256sum -c MANIFEST' says which); refusing to delete them even with --force"
}

replacing=0
if [[ -d "$outdir" ]] && holds_files "$outdir"; then
    if ((!force)); then
        die "OUTDIR '$outdir' is not empty; pass --force to replace an earlier distribution there"
    fi
    check_replaceable "$outdir"
    replacing=1
fi
# One run at a time: the lock is held on OUTDIR itself until this script exits.
command -v flock >/dev/null || die "'flock' (util-linux) is needed and not on PATH"
mkdir -p -- "$outdir"
outdir="$(cd -- "$outdir" && pwd)"
exec {lock}<"$outdir"
flock -n "$lock" || die "another $prog is writing OUTDIR '$outdir'"

cd "$root"
for tool in cargo python3 sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is needed and not on PATH"
done

# cargo's JSON messages name the files it built (wherever CARGO_TARGET_DIR puts them) and the
# build script's OUT_DIR, where the kernel origin is recorded; diagnostics still go to stderr.
messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
cargo build --release --workspace --locked --message-format=json-render-diagnostics >"$messages"

# Prints "NAME PATH" for each build output the layout names, and "out_dir PATH".
read_outputs() {
    python3 - "$messages" <<'EOF'
import json, os, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact":
        if m.get("executable") and m["target"]["name"] == "kvh":
            found["@kvh"] = m["executable"]
        for f in m.get("filenames", []):
            for name in ("libkvhygiene.so", "libkvhygiene_preload.so"):
                if f.endswith("/" + name):
                    found["@" + name[:-3]] = f
    elif m.get("reason") == "build-script-executed":
        # The root package's build script is the one that writes the kernel images.
        if os.path.exists(os.path.join(m["out_dir"], "kernel_images.rs")):
            found["out_dir"] = m["out_dir"]
for k, v in sorted(found.items()):
    print(k, v)
EOF
}
declare -A built=()
while read -r name path; do built["$name"]="$path"; done < <(read_outputs)
for name in @kvh @libkvhygiene @libkvhygiene_preload out_dir; do
    [[ -n "${built[$name]:-}" ]] || die "cargo's build messages did not name $name"
done

origin="$(grep -ho 'KERNEL_ORIGIN: &str = "[^"]*"' "${built[out_dir]}/kernel_images.rs" | cut -d'"' -f2)"
[[ -n "$origin" ]] || die "no KERNEL_ORIGIN in ${built[out_dir]}/kernel_images.rs"
if [[ "$origin" == *"committed kernels/scrub.ptx"* ]]; then
    # Works on every supported GPU (the driver JIT-compiles it at first load), but a release
    # meant for GPUs should carry SASS: say so where the operator looks.
    echo "$prog: WARNING: kernels are the committed PTX fallback (JIT-compiled by the driver at load); run scripts/install-nvcc.sh first to embed SASS" >&2
fi

# Assembled next to OUTDIR and moved in only when complete, so a failure leaves OUTDIR as it was.
stage="$(mktemp -d "$outdir/.build-release.XXXXXX")"
trap 'rm -f "$messages"; rm -rf "$stage"' EXIT

while read -r src dest; do
    from="$src"
    [[ "$src" == @* ]] && from="${built[$src]}"
    mkdir -p "$stage/$(dirname "$dest")"
    if [[ "$dest" == bin/* || "$dest" == lib/* ]]; then
        install -m 0755 "$from" "$stage/$dest"
    else
        install -m 0644 "$from" "$stage/$dest"
    fi
done < <(layout)

commit="${KVHYGIENE_SOURCE_COMMIT:-}"
if [[ -z "$commit" ]]; then
    if git -C "$root" rev-parse --verify -q HEAD >/dev/null 2>&1; then
        commit="$(git -C "$root" rev-parse HEAD)"
        git -C "$root" diff --quiet HEAD -- 2>/dev/null || commit="$commit (with uncommitted changes)"
    else
        commit="unknown"
    fi
fi
glibc="unknown (objdump not found)"
if command -v objdump >/dev/null; then
    glibc="$(objdump -T "$stage/bin/kvh" "$stage"/lib/*.so | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n1)"
fi
{
    echo "version: $("$stage/bin/kvh" --version)"
    echo "commit: $commit"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
    echo "kernels: $origin"
    echo "glibc needed: $glibc"
} >"$stage/BUILD-INFO"
# sha256sum's own format, paths relative to OUTDIR: `cd OUTDIR && sha256sum -c MANIFEST`.
manifest="$(cd "$stage" && find . -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 sha256sum)"
printf '%s\n' "$manifest" >"$stage/MANIFEST"

if ((replacing)); then
    # Checked again: the build took minutes, and OUTDIR may have changed meanwhile.
    check_replaceable "$outdir"
fi
while IFS= read -r -d '' entry; do
    if [[ "$entry" != "$stage" ]] && is_leftover "$entry"; then rm -rf -- "$entry"; fi
done < <(find "$outdir" -mindepth 1 -maxdepth 1 -name '.build-release.*' -print0)
for o in "${owned[@]}"; do rm -rf -- "${outdir:?}/$o"; done
for o in "${owned[@]}"; do mv -- "$stage/$o" "$outdir/$o"; done
rmdir -- "$stage"
cat "$outdir/BUILD-INFO"
echo "$prog: distribution in $outdir ($(wc -l <"$outdir/MANIFEST") files; check it with: scripts/check-release.sh $outdir)"
