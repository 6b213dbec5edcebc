#!/usr/bin/env bash
# The corpus's second daemon: Debian's security fixes for dnsmasq (bookworm), each built before and
# after the fix with Debian's hardening flags, in the same cache layout as nginx (build.sh, whose
# helpers this script sources; see tests/corpus/README.md):
#
#   ${LIVEPATCH_CACHE:-~/.cache/livepatch}/corpus/
#     src/dnsmasq_<debver>/dnsmasq-<upstream>/       pristine upstream tree + debian/ (unpatched)
#     dnsmasq-<debver>/<patch>/<variant>/{old,new,fix.patch,manifest.json}
#     dnsmasq-<debver>/index.json                    every pair, written after the checks pass
#     logs/dnsmasq-<debver>/<variant>/               patch and make logs of the last build
#
# Build: upstream's Makefile, as debian/rules calls it (CFLAGS = dpkg-buildflags CFLAGS + CPPFLAGS,
# LDFLAGS), with COPTS=-DHAVE_DNSSEC (Debian's default build also has DBus, IDN2, conntrack and
# nftables sets; they are left out to keep the build dependencies to nettle and gmp: no security
# patch touches that code). The Makefile makes every object depend on every header and on the
# COPTS, so the incremental rebuild at each series position is complete.
#
#   tests/corpus/build-dnsmasq.sh          build what is missing ("cached" otherwise), check, summary
#   tests/corpus/build-dnsmasq.sh --print  print the corpus directory (no build)
#
# Environment: LIVEPATCH_DNSMASQ_VERSION (exact Debian version), LIVEPATCH_CORPUS_VARIANTS,
# LIVEPATCH_CORPUS_JOBS (at most 2), LIVEPATCH_CACHE, as for build.sh. build.sh runs this script
# after nginx (LIVEPATCH_CORPUS_DNSMASQ=0 skips it).
set -euo pipefail

# shellcheck source=build.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/build.sh"

PKG=dnsmasq
PINNED_VERSION="2.90-4~deb12u2"
LOCK_NAME=.lock-dnsmasq   # build.sh calls this script; it does not share nginx's lock
COPTS_D="-DHAVE_DNSSEC"

install_build_deps() {
    local p missing=()
    for p in dpkg-dev gcc make binutils pkgconf nettle-dev libgmp-dev; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "root needed to install ${missing[*]}"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# A C file of the tree is compiled when the last build left its object in src/.
is_compiled() { local b="${2##*/}"; [ -f "$1/src/${b%.c}.o" ]; }
binary_runs() { "$1" --version >/dev/null 2>&1; }

make_tree() {   # $1 tree, $2 log file
    (cd "$1" && nice -n 15 make -j"$JOBS" COPTS="$COPTS_D" CFLAGS="$CFLAGS_V $CPPFLAGS_V" LDFLAGS="$LDFLAGS_V" \
        >"$2" 2>&1) || { tail -30 "$2" >&2; die "make failed (log: $2)"; }
}

build_variant() {
    local variant="$1" i todo=()
    prepare_variant "$variant"
    for i in "${SEC[@]}"; do
        if pair_cached "$i" "$variant" "$KEY_V"; then
            log "$variant $(patch_name "$i"): cached"
        else
            todo+=("$i")
        fi
    done
    [ ${#todo[@]} -gt 0 ] || return 0
    declare -A want=()
    for i in "${todo[@]}"; do want[$i]=1; want[$((i + 1))]=1; done

    local work logdir
    work="$(work_dir "$variant")"; logdir="$CACHE/logs/$PKG-$VERSION/$variant"
    local tree="$work/$(basename "$SRCDIR")" states="$work/states"
    rm -rf "$work"; mkdir -p "$work" "$states" "$logdir"
    rm -f "$logdir/patch.log"
    cp -a "$SRCDIR" "$tree"
    log "$variant: CFLAGS=$CFLAGS_V"
    log "$variant: CPPFLAGS=$CPPFLAGS_V"
    log "$variant: LDFLAGS=$LDFLAGS_V"
    log "$variant: make ${CONFIGURE_ARGS[*]}"
    declare -A secs=()
    local k last=-1 t0 max=0
    for k in "${!want[@]}"; do [ "$k" -gt "$max" ] && max="$k"; done
    for ((k = 0; k <= max; k++)); do
        if [ "$k" -gt 0 ]; then
            local j=$((k - 1))
            (cd "$tree" && patch "${SERIES_P[$j]}" --forward --no-backup-if-mismatch -s -i "$(patch_file "$j")") \
                >>"$logdir/patch.log" 2>&1 || die "$variant: patch ${SERIES[$j]} does not apply (log: $logdir/patch.log)"
        fi
        [ -n "${want[$k]:-}" ] || continue
        t0="$(now)"
        make_tree "$tree" "$logdir/make-$k.log"
        [ "$last" -ge 0 ] || check_compiled "$tree"
        cp "$tree/src/dnsmasq" "$states/$k"
        secs[$k]=$(( $(now) - t0 ))
        log "$variant: built series position $k/${#SERIES[@]}$( [ "$k" -gt 0 ] && echo " (after ${SERIES[$((k - 1))]})") in ${secs[$k]}s$( [ "$last" -lt 0 ] && echo ' (full build)')"
        last="$k"
    done
    for i in "${todo[@]}"; do write_pair "$i" "$variant" "$tree" "$states"; done
    rm -rf "$work"
}

main() {
    local want="${LIVEPATCH_DNSMASQ_VERSION:-}"
    if [ "${1:-}" = "--print" ]; then
        package_dir "$want"
        return 0
    fi
    [ $# -eq 0 ] || { log "usage: $0 [--print]"; exit 2; }
    package_start "$want"
    CONFIGURE_ARGS=("COPTS=$COPTS_D")   # make variables (the manifest's configure_args)
    package_build
    [ "$PACKAGE_FAILED" -eq 0 ] || die "$PACKAGE_FAILED pair(s) failed the checks"
}

main "$@"
