#!/usr/bin/env bash
# Release build: static musl binaries (LTO, one codegen unit, stripped; see
# [profile.release] in Cargo.toml) for x86_64 and, when its toolchain is present,
# aarch64. Prints each binary's size against the 20 MB budget and what dominates it, and
# writes dist/release/SHA256SUMS.
#
#   BACKUPY_UPDATE_PUBKEY="$(cat key.pub.pem)" scripts/release.sh
#                          # → dist/release/<target>/backupy-agent, …, trusting that key
#                          # (PEM of the P-256 public half of the release signing key)
#   BACKUPY_RELEASE_NO_SELF_UPDATE=1 scripts/release.sh
#                          # a build with self-update switched off (container images:
#                          # they are updated by pulling a new image)
#   RELEASE_TARGETS=x86_64-unknown-linux-musl scripts/release.sh     # only these targets
#
# It refuses to build with neither: the update key is the one thing that decides which
# binaries an agent will install, so it is never a default (issue 16, docs/security.md).
#
# Needs: rustup target add x86_64-unknown-linux-musl; Debian musl-tools (musl-gcc, for
# the C parts: SQLite, zstd). On this 2-core machine the x86_64 build takes ~7 min.
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET=$((20 * 1000 * 1000))
out=${RELEASE_OUT:-dist/release}
targets=${RELEASE_TARGETS:-"x86_64-unknown-linux-musl aarch64-unknown-linux-musl"}

die() { echo "release: $*" >&2; exit 1; }

if [[ -n ${BACKUPY_UPDATE_PUBKEY:-} ]]; then
    grep -q -- '-----BEGIN PUBLIC KEY-----' <<<"$BACKUPY_UPDATE_PUBKEY" \
        || die "BACKUPY_UPDATE_PUBKEY does not hold a PEM public key (-----BEGIN PUBLIC KEY-----)"
    echo "release: self-update trusts the update key in BACKUPY_UPDATE_PUBKEY" >&2
elif [[ ${BACKUPY_RELEASE_NO_SELF_UPDATE:-} == 1 ]]; then
    unset BACKUPY_UPDATE_PUBKEY
    echo "release: building without an update key: self-update is unavailable in this build" >&2
else
    die "no update key: set BACKUPY_UPDATE_PUBKEY to the PEM public key that signs releases, or \
BACKUPY_RELEASE_NO_SELF_UPDATE=1 for a build without self-update (see docs/security.md)"
fi

have_target() { rustup target list --installed 2>/dev/null | grep -qx "$1"; }

mkdir -p "$out"
built=()
for target in $targets; do
    arch=${target%%-*}
    case $arch in
        x86_64) cc=musl-gcc ;;
        aarch64) cc=aarch64-linux-musl-gcc ;;
        *) die "unknown target $target" ;;
    esac
    if ! have_target "$target"; then
        [[ $arch == x86_64 ]] && die "the $target toolchain is missing: rustup target add $target"
        echo "release: skipping $target: its Rust target is not installed (rustup target add $target, and a $cc cross compiler)" >&2
        continue
    fi
    if ! command -v "$cc" >/dev/null; then
        [[ $arch == x86_64 ]] && die "$cc is missing: apt-get install musl-tools"
        echo "release: skipping $target: no $cc cross compiler on PATH" >&2
        continue
    fi
    echo "==> building $target (release: LTO, codegen-units=1, stripped)" >&2
    t0=$(date +%s)
    # musl-gcc compiles the C parts only: as the linker it would make a dynamically
    # linked PIE asking for /lib/ld-musl (rustc links musl statically by itself). A
    # cross target needs its cross gcc as the linker too.
    linker=()
    if [[ $arch != "$(uname -m)" ]]; then
        linker=("CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_LINKER=$cc")
    fi
    env "CC_${target//-/_}=$cc" "${linker[@]}" \
        cargo build --locked --release --target "$target" --bins
    echo "    built in $(($(date +%s) - t0)) s" >&2
    mkdir -p "$out/$target"
    for bin in backupy-agent backupy-decrypt; do
        cp "${CARGO_TARGET_DIR:-target}/$target/release/$bin" "$out/$target/$bin"
    done
    built+=("$target")
done
((${#built[@]})) || die "nothing was built"

for target in "${built[@]}"; do
    bin=$out/$target/backupy-agent
    size=$(stat -c %s "$bin")
    awk -v b="$bin" -v s="$size" -v l="$BUDGET" \
        'BEGIN { printf "size %s: %d bytes (%.1f MB of the %d MB budget)\n", b, s, s / 1e6, l / 1e6 }'
    # A static(-pie) executable asks for no program interpreter and no shared library.
    if readelf -l "$bin" | grep -q 'INTERP' || readelf -d "$bin" | grep -q '(NEEDED)'; then
        die "$bin is not statically linked: $(readelf -d "$bin" | grep NEEDED | tr -s ' ')"
    fi
    ((size <= BUDGET)) || die "$bin is $size bytes, over the $BUDGET-byte budget"
done

# What dominates the size: the stripped binary has no symbols left, so show its section
# sizes and, as an approximation, the largest dependency libraries before LTO.
host=${built[0]}
echo "==> what dominates the size of $out/$host/backupy-agent" >&2
size -A "$out/$host/backupy-agent" 2>/dev/null | sort -k2 -n -r | head -n 6 || true
rlibs=${CARGO_TARGET_DIR:-target}/$host/release/deps
if compgen -G "$rlibs/*.rlib" >/dev/null; then
    echo "largest dependency libraries (code before LTO):"
    # shellcheck disable=SC2012
    { ls -S "$rlibs"/*.rlib || true; } | head -n 8 | while read -r f; do
        printf '  %8d KiB  %s\n' $(($(stat -c %s "$f") / 1024)) "$(basename "$f" | sed 's/-[0-9a-f]*\.rlib$//; s/^lib//')"
    done
fi

(cd "$out" && find . -type f -name 'backupy-*' ! -name '*.sig' | sed 's|^\./||' | sort | xargs sha256sum >SHA256SUMS)
echo "==> $out/SHA256SUMS" >&2
cat "$out/SHA256SUMS"
"$out/$host/backupy-agent" version --json
