#!/usr/bin/env bash
# Build the real-program corpus: Debian's security fixes for nginx, each built before and after
# the fix with Debian's own hardening flags, cached outside the clone (see tests/corpus/README.md):
#
#   ${LIVEPATCH_CACHE:-~/.cache/livepatch}/corpus/
#     src/nginx_<debver>/                      the Debian source package (.dsc, orig, debian tar)
#                        nginx-<upstream>/     pristine upstream tree + debian/ (patches unapplied)
#     nginx-<debver>/<patch>/<variant>/old     nginx built from upstream + every patch before <patch>
#                                     /new     the same plus <patch>
#                                     /fix.patch      the exact file from debian/patches
#                                     /manifest.json  package, versions, CVE ids, flags, paths, ids
#     nginx-<debver>/index.json                every pair, written after the checks pass
#     logs/nginx-<debver>/<variant>/           configure and make logs of the last build
#
# Variants: "hardened" (dpkg-buildflags with hardening=+all: -g -O2 -fstack-protector-strong
# -D_FORTIFY_SOURCE=2, PIE, -z relro -z now) and "lto" (the same with -O3 -flto). Binaries keep
# their symbols and debug info and carry a GNU build id.
#
#   tests/corpus/build.sh            build what is missing (pairs already there print "cached"),
#                                    check every pair, print a summary
#   tests/corpus/build.sh --print    print the corpus directory of the chosen version (no build)
#
# Environment: LIVEPATCH_NGINX_VERSION  exact Debian version (default: $PINNED_VERSION below if
#                                       cached or still in the archive, else the newest one there)
#              LIVEPATCH_CORPUS_VARIANTS  default "hardened lto"
#              LIVEPATCH_CORPUS_JOBS    make -j (default and maximum 2)
#              LIVEPATCH_CORPUS_DNSMASQ  0: do not run build-dnsmasq.sh (the corpus's second daemon,
#                                       which sources this script for its helpers) after nginx
#
# Idempotent and safe to run concurrently (one flock; a pair is built in a temporary directory and
# moved in last, so an interrupted run never leaves a pair that looks cached). Needs root the first
# time only (deb-src entry, build dependencies). Runs the compilers with nice -n 15.
#
# How a variant is built: one work tree per variant, at a fixed path, configured once with the
# modules every security patch touches; the patches of debian/patches/series are applied one at a
# time in series order and the tree is rebuilt (incrementally: nginx's generated Makefile makes
# every object depend on the headers of its subsystem) at each series position that some pair
# needs. The binary at position k is then exactly "upstream + the first k patches", so the "after"
# of one fix is the "before" of the next when no other patch lies between them. A patch that touches
# anything outside src/ (auto/ scripts, for instance) makes the tree reconfigure and rebuild fully.
set -euo pipefail

PKG=nginx
PINNED_VERSION="1.22.1-9+deb12u9"
RECIPE=2   # bump when the way the binaries are built changes: every pair is rebuilt
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${LIVEPATCH_CACHE:-$HOME/.cache/livepatch}/corpus"
VARIANTS="${LIVEPATCH_CORPUS_VARIANTS:-hardened lto}"
JOBS="${LIVEPATCH_CORPUS_JOBS:-2}"
[ "$JOBS" -ge 1 ] 2>/dev/null || JOBS=2
[ "$JOBS" -le 2 ] || JOBS=2
SRC_LIST=/etc/apt/sources.list.d/livepatch-src.sources
LOCK_NAME=.lock   # under $CACHE; each package's script has its own

log() { echo "corpus: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s; }

# --- small helpers ----------------------------------------------------------------------------
json_str() {   # JSON string literal of $1
    local s="$1"
    s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\t'/\\t}"; s="${s//$'\n'/\\n}"; s="${s//$'\r'/\\r}"
    printf '"%s"' "$s"
}
json_list() {  # JSON list of strings from the arguments
    local out="" x
    for x in "$@"; do out+="${out:+, }$(json_str "$x")"; done
    printf '[%s]' "$out"
}
gcc_version() { gcc --version | sed -n 1p; }
build_id() { readelf -n "$1" 2>/dev/null | awk '/Build ID:/ && !done { print $3; done = 1 }'; }
has_debug_info() { [ "$(readelf -S "$1" | grep -c '\.debug_info')" -gt 0 ]; }
is_pie() { [ "$(readelf -h "$1" | grep -c 'Type: *DYN')" -gt 0 ]; }
text_hash() {  # hash of the code only (.text), to tell a code change from a debug-info-only change
    local tmp; tmp="$(mktemp)"
    objcopy -O binary --only-section=.text "$1" "$tmp" && sha256sum <"$tmp" | cut -c1-16
    rm -f "$tmp"
}

# --- version ------------------------------------------------------------------------------------
cached_versions() {   # complete corpora in the cache, newest first
    local d
    for d in "$CACHE"/$PKG-*/index.json; do
        [ -f "$d" ] || continue
        d="${d%/index.json}"; echo "${d##*/$PKG-}"
    done | sort -r -V
}

# --- 1. deb-src entry and build dependencies -----------------------------------------------------
enable_deb_src() {
    local added=0
    if [ ! -f "$SRC_LIST" ]; then
        [ "$(id -u)" = 0 ] || die "root needed to add $SRC_LIST"
        local tmp; tmp="$(mktemp)"
        # Every deb822 stanza of Debian's archive ("Types: deb", Debian's keyring) again as deb-src,
        # with the same URIs, Suites, Components and Signed-By; comments dropped.
        local f
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] && [ "$f" != "$SRC_LIST" ] || continue
            awk 'BEGIN { RS = ""; ORS = "\n\n" }
                 /(^|\n)Types:[^\n]*[ \t]deb([ \t]|\n|$)/ && /debian-archive-keyring/ {
                     s = $0; gsub(/(^|\n)#[^\n]*/, "", s); sub(/^\n/, "", s)
                     sub(/Types:[^\n]*/, "Types: deb-src", s); print s }' "$f"
        done >"$tmp"
        [ -s "$tmp" ] || { rm -f "$tmp"; die "no Debian deb822 source (Types: deb) in /etc/apt/sources.list.d"; }
        install -m 0644 "$tmp" "$SRC_LIST"
        rm -f "$tmp"
        log "added $SRC_LIST ($(grep -c '^Types: deb-src' "$SRC_LIST") stanzas)"
        added=1
    fi
    if [ "$added" = 1 ] || [ -z "$(apt-cache showsrc --only-source "$PKG" 2>/dev/null | sed -n 1p)" ]; then
        apt-get update -qq
    fi
}

install_build_deps() {
    local p missing=()
    for p in dpkg-dev gcc make binutils libpcre2-dev zlib1g-dev libssl-dev; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "root needed to install ${missing[*]}"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# --- 2. the source package -------------------------------------------------------------------------
# Sets SRCDIR (pristine tree with debian/) and VERSION.
fetch_source() {
    local want="$1" candidates=() v
    if [ -n "$want" ]; then
        candidates=("$want")
    else
        candidates=("$PINNED_VERSION")
        while read -r v; do [ "$v" = "$PINNED_VERSION" ] || candidates+=("$v"); done < <(
            apt-cache showsrc --only-source "$PKG" 2>/dev/null | sed -n 's/^Version: //p' | sort -r -V -u)
    fi
    for v in "${candidates[@]}"; do
        local dir="$CACHE/src/${PKG}_$v" up="${v%-*}"
        up="${up#*:}"
        if [ ! -f "$dir/.extracted" ]; then
            rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
            if ! (cd "$dir.tmp" && apt-get source --download-only -qq "$PKG=$v" >/dev/null 2>"$dir.tmp/apt.err"); then
                log "could not download $PKG $v: $(grep -m1 '^E:' "$dir.tmp/apt.err" || echo '?')"
                rm -rf "$dir.tmp"; continue
            fi
            (cd "$dir.tmp" && dpkg-source -q -x --skip-patches "${PKG}_${v#*:}.dsc" "$PKG-$up" >dpkg-source.log 2>&1) \
                || { cat "$dir.tmp/dpkg-source.log" >&2; die "dpkg-source -x failed in $dir.tmp"; }
            rm -f "$dir.tmp/apt.err"
            touch "$dir.tmp/.extracted"
            rm -rf "$dir"; mv "$dir.tmp" "$dir"
            log "fetched $PKG $v into $dir"
        fi
        SRCDIR="$dir/$PKG-$up"; VERSION="$v"
        [ -f "$SRCDIR/debian/patches/series" ] || die "$SRCDIR has no debian/patches/series"
        return 0
    done
    die "no source of $PKG could be downloaded (tried ${candidates[*]})"
}

# --- 3. the patches -----------------------------------------------------------------------------
# SERIES[i] = patch file name, SERIES_P[i] = its -pN option; SEC = indices of security patches.
read_series() {
    SERIES=(); SERIES_P=(); SEC=()
    local line name opt
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"; read -r name opt <<<"$line" || true
        [ -n "${name:-}" ] || continue
        [ -f "$SRCDIR/debian/patches/$name" ] || die "series names a missing patch: $name"
        SERIES+=("$name"); SERIES_P+=("${opt:--p1}")
    done <"$SRCDIR/debian/patches/series"
    local i
    for i in "${!SERIES[@]}"; do
        [ -n "$(patch_cves "$i")" ] && SEC+=("$i")
    done
    return 0
}
patch_file() { echo "$SRCDIR/debian/patches/${SERIES[$1]}"; }
patch_name() { local n="${SERIES[$1]}"; echo "${n%.patch}"; }
patch_header() { sed -n '/^\(diff \|--- \|Index: \)/q;p' "$(patch_file "$1")"; }
patch_cves() {  # CVE ids named by the file name or the header (before the first diff)
    { echo "${SERIES[$1]}"; patch_header "$1"; } | grep -oiE 'CVE-[0-9]{4}-[0-9]{4,}' | tr a-z A-Z | sort -u | tr '\n' ' ' | sed 's/ $//' || true
}
patch_subject() {
    patch_header "$1" | sed -n 's/^\(Subject\|Description\): *\(\[PATCH[^]]*\] *\)\{0,1\}//p' | awk 'NR == 1'
}
patch_files() {  # files the patch changes, relative to the tree (after -pN)
    local n="${SERIES_P[$1]#-p}"
    sed -n 's/^+++ \([^\t ]*\).*/\1/p' "$(patch_file "$1")" | grep -v '^/dev/null$' \
        | cut -d/ -f$((n + 1))- | sort -u
}
patch_functions() {  # the functions git named in the hunk headers ("@@ ... @@ context"): a hint only
    local n="${SERIES_P[$1]#-p}"
    awk -v n="$n" '
        /^\+\+\+ / { f = $2; sub(/\t.*/, "", f); for (i = 0; i < n; i++) sub(/^[^\/]*\//, "", f); next }
        /^@@ / { c = $0; sub(/^@@[^@]*@@ ?/, "", c)
                 if (match(c, /[A-Za-z_][A-Za-z0-9_]*\(/)) print f ":" substr(c, RSTART, RLENGTH - 1) }
    ' "$(patch_file "$1")" | awk '!seen[$0]++'
}

# configure options for the modules the security patches touch, beyond the base set
module_options() {
    local i f m opts=()
    for i in "${SEC[@]}"; do
        while read -r f; do
            case "$f" in
                src/http/v2/*) opts+=(--with-http_v2_module) ;;
                src/http/modules/ngx_http_grpc_module.c) opts+=(--with-http_v2_module) ;;  # built only with v2
                src/event/ngx_event_openssl*) opts+=(--with-http_ssl_module) ;;
                src/mail/*) opts+=(--with-mail --with-mail_ssl_module) ;;
                src/stream/*) opts+=(--with-stream --with-stream_ssl_module) ;;
            esac
            # an optional module named after the file: --with-http_mp4_module, --with-stream_X_module...
            if [[ "$f" =~ ^src/(http|stream|mail)/modules/ngx_(http|stream|mail)_([a-z0-9_]+)_module\.c$ ]] \
               || [[ "$f" =~ ^src/(stream|mail)/ngx_(stream|mail)_([a-z0-9_]+)_module\.c$ ]]; then
                m="--with-${BASH_REMATCH[2]}_${BASH_REMATCH[3]}_module"
                grep -q -- "^ *$m)" "$SRCDIR/auto/options" && opts+=("$m")
            fi
        done < <(patch_files "$i")
    done
    printf '%s\n' "${opts[@]}" | awk 'NF && !seen[$0]++'
}

# --- flags --------------------------------------------------------------------------------------
# Sets CFLAGS_V, CPPFLAGS_V, LDFLAGS_V for variant $1, computed inside the work tree so that
# Debian's -ffile-prefix-map maps that tree to "." (the paths in the binaries do not depend on it).
variant_flags() {
    local variant="$1" tree="$2"
    CFLAGS_V="$(cd "$tree" && DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CFLAGS)"
    CPPFLAGS_V="$(cd "$tree" && DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CPPFLAGS)"
    LDFLAGS_V="$(cd "$tree" && DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get LDFLAGS)"
    # PIE is the compiler's default on Debian, so dpkg-buildflags prints no flag for it: say it.
    [[ " $CFLAGS_V " == *" -fPIE "* ]] || CFLAGS_V+=" -fPIE"
    [[ " $LDFLAGS_V " == *" -pie "* ]] || LDFLAGS_V+=" -pie"
    LDFLAGS_V+=" -Wl,--build-id"
    case "$variant" in
        hardened) ;;
        lto)
            CFLAGS_V="$(sed 's/\(^\| \)-O[0-9s]\( \|$\)/\1-O3\2/' <<<"$CFLAGS_V") -flto=$JOBS"
            LDFLAGS_V="-O3 -flto=$JOBS $LDFLAGS_V"
            ;;
        *) die "unknown variant $variant (hardened, lto)" ;;
    esac
}

# Sets CFLAGS_V, CPPFLAGS_V, LDFLAGS_V and KEY_V (a digest of everything that shapes the binaries:
# flags, configure arguments, compiler, the patch series) for variant $1.
prepare_variant() {
    local variant="$1" tree created=0
    tree="$(work_dir "$variant")/$(basename "$SRCDIR")"
    [ -d "$tree" ] || { mkdir -p "$tree"; created=1; }
    variant_flags "$variant" "$tree"
    [ "$created" = 0 ] || rmdir "$tree" "${tree%/*}" "${tree%/*/*}" "${tree%/*/*/*}" 2>/dev/null || true
    KEY_V="$( { echo "$RECIPE"; echo "$CFLAGS_V"; echo "$CPPFLAGS_V"; echo "$LDFLAGS_V"
               printf '%s\n' "${CONFIGURE_ARGS[@]}"; gcc_version
               cat "$SRCDIR/debian/patches/series"; } | sha256sum | cut -c1-16)"
}

# Write the pair of security patch $1, variant $2 from the work tree $3 (for is_compiled) and the
# binaries $4/<series position>; uses secs[] of the caller. Moved into place last.
write_pair() {
    local i="$1" variant="$2" tree="$3" states="$4" gccv; gccv="$(gcc_version)"
    local dst tmp name cves=() files=() funcs=() f
    dst="$(pair_dir "$i" "$variant")"; name="$(patch_name "$i")"
    tmp="$OUT/.tmp-$name-$variant.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    cp "$states/$i" "$tmp/old"; cp "$states/$((i + 1))" "$tmp/new"
    cp "$(patch_file "$i")" "$tmp/fix.patch"
    read -r -a cves <<<"$(patch_cves "$i")"
    mapfile -t files < <(patch_files "$i")
    mapfile -t funcs < <(patch_functions "$i")
    local compiled=()
    for f in "${files[@]}"; do
        case "$f" in *.c) is_compiled "$tree" "$f" && compiled+=("$f") ;; esac
    done
    {
        echo "{"
        echo "  \"package\": $(json_str "$PKG"),"
        echo "  \"debian_version\": $(json_str "$VERSION"),"
        echo "  \"upstream_version\": $(json_str "$(basename "$SRCDIR" | sed "s/^$PKG-//")"),"
        echo "  \"patch\": $(json_str "${SERIES[$i]}"),"
        echo "  \"name\": $(json_str "$name"),"
        echo "  \"series_index\": $i,"
        echo "  \"patches_before\": $(json_list "${SERIES[@]:0:$i}"),"
        echo "  \"cve\": $(json_list "${cves[@]}"),"
        echo "  \"subject\": $(json_str "$(patch_subject "$i")"),"
        echo "  \"files\": $(json_list "${files[@]}"),"
        echo "  \"compiled_files\": $(json_list "${compiled[@]}"),"
        echo "  \"hunk_context_functions\": $(json_list "${funcs[@]}"),"
        echo "  \"variant\": $(json_str "$variant"),"
        echo "  \"compiler\": $(json_str "$gccv"),"
        echo "  \"cflags\": $(json_str "$CFLAGS_V"),"
        echo "  \"cppflags\": $(json_str "$CPPFLAGS_V"),"
        echo "  \"ldflags\": $(json_str "$LDFLAGS_V"),"
        echo "  \"configure_args\": $(json_list "${CONFIGURE_ARGS[@]}"),"
        echo "  \"config_key\": $(json_str "$KEY_V"),"
        echo "  \"old\": {\"path\": $(json_str "$dst/old"), \"build_id\": $(json_str "$(build_id "$tmp/old")"), \"build_seconds\": ${secs[$i]}},"
        echo "  \"new\": {\"path\": $(json_str "$dst/new"), \"build_id\": $(json_str "$(build_id "$tmp/new")"), \"build_seconds\": ${secs[$((i + 1))]}},"
        echo "  \"fix_patch\": $(json_str "$dst/fix.patch")"
        echo "}"
    } >"$tmp/manifest.json"
    rm -rf "$dst"; mkdir -p "$(dirname "$dst")"; mv "$tmp" "$dst"
    log "$variant $name: built"
}

# --- building one variant ------------------------------------------------------------------------
work_dir() { echo "$CACHE/build/$PKG-$VERSION/$1"; }
pair_dir() { echo "$OUT/$(patch_name "$1")/$2"; }
pair_cached() {  # $1 series index, $2 variant, $3 configuration key
    [ -f "$(pair_dir "$1" "$2")/manifest.json" ] && grep -q "\"config_key\": \"$3\"" "$(pair_dir "$1" "$2")/manifest.json"
}

# Whether the configured tree $1 compiles the C file $2 (per package: build-<pkg>.sh overrides it).
is_compiled() { grep -q "$2" "$1/objs/Makefile"; }

# Every C file a security patch changes must be compiled by this configuration.
check_compiled() {
    local tree="$1" i f bad=0
    for i in "${SEC[@]}"; do
        while read -r f; do
            case "$f" in
                *.c) is_compiled "$tree" "$f" \
                         || { log "error: ${SERIES[$i]} changes $f, which this configuration does not compile"; bad=1; } ;;
            esac
        done < <(patch_files "$i")
    done
    [ "$bad" = 0 ] || die "add the module to module_options in $0"
}

configure_tree() {
    local tree="$1" logdir="$2"
    (cd "$tree" && nice -n 15 ./configure --with-cc-opt="$CFLAGS_V $CPPFLAGS_V" --with-ld-opt="$LDFLAGS_V" \
        "${CONFIGURE_ARGS[@]}" >"$logdir/configure.log" 2>&1) \
        || { tail -20 "$logdir/configure.log" >&2; die "configure failed (log: $logdir/configure.log)"; }
}

build_variant() {
    local variant="$1" i todo=()
    prepare_variant "$variant"
    for i in "${SEC[@]}"; do pair_cached "$i" "$variant" "$KEY_V" || todo+=("$i"); done
    for i in "${SEC[@]}"; do
        if pair_cached "$i" "$variant" "$KEY_V"; then
            log "$variant $(patch_name "$i"): cached"
        fi
    done
    [ ${#todo[@]} -gt 0 ] || return 0
    # series positions (number of patches applied) whose binary some missing pair needs
    declare -A want=()
    for i in "${todo[@]}"; do want[$i]=1; want[$((i + 1))]=1; done

    local work logdir
    work="$(work_dir "$variant")"; logdir="$CACHE/logs/$PKG-$VERSION/$variant"
    local tree="$work/$(basename "$SRCDIR")" states="$work/states"
    rm -rf "$work"; mkdir -p "$work" "$states" "$logdir"
    cp -a "$SRCDIR" "$tree"
    log "$variant: CFLAGS=$CFLAGS_V"
    log "$variant: CPPFLAGS=$CPPFLAGS_V"
    log "$variant: LDFLAGS=$LDFLAGS_V"
    log "$variant: configure ${CONFIGURE_ARGS[*]}"
    configure_tree "$tree" "$logdir"
    check_compiled "$tree"
    declare -A secs=()
    local k last=-1 t0 max=0
    for k in "${!want[@]}"; do [ "$k" -gt "$max" ] && max="$k"; done
    for ((k = 0; k <= max; k++)); do
        if [ "$k" -gt 0 ]; then
            local j=$((k - 1))
            (cd "$tree" && patch "${SERIES_P[$j]}" --forward --no-backup-if-mismatch -s -i "$(patch_file "$j")") \
                >>"$logdir/patch.log" 2>&1 || die "$variant: patch ${SERIES[$j]} does not apply (log: $logdir/patch.log)"
            if grep -qv '^src/' <<<"$(patch_files "$j")"; then
                log "$variant: ${SERIES[$j]} touches files outside src/: reconfiguring"
                configure_tree "$tree" "$logdir"
            fi
        fi
        [ -n "${want[$k]:-}" ] || continue
        t0="$(now)"
        (cd "$tree" && nice -n 15 make -j"$JOBS" >"$logdir/make-$k.log" 2>&1) \
            || { tail -30 "$logdir/make-$k.log" >&2; die "$variant: make failed at series position $k (log: $logdir/make-$k.log)"; }
        cp "$tree/objs/nginx" "$states/$k"
        secs[$k]=$(( $(now) - t0 ))
        log "$variant: built series position $k/${#SERIES[@]}$( [ "$k" -gt 0 ] && echo " (after ${SERIES[$((k - 1))]})") in ${secs[$k]}s$( [ "$last" -lt 0 ] && echo ' (full build)')"
        last="$k"
    done
    for i in "${todo[@]}"; do write_pair "$i" "$variant" "$tree" "$states"; done
    rm -rf "$work"
}

# --- 4. checks and summary -----------------------------------------------------------------------
binary_runs() { "$1" -V >/dev/null 2>&1; }   # per package: build-<pkg>.sh overrides it

check_all() {
    local variant i bad=0 rows=() dir o n bo bn code status
    for variant in $VARIANTS; do
        prepare_variant "$variant"
        for i in "${SEC[@]}"; do
            dir="$(pair_dir "$i" "$variant")"; o="$dir/old"; n="$dir/new"; status=ok
            bo=""; bn=""; code="-"
            if [ ! -x "$o" ] || [ ! -x "$n" ] || [ ! -f "$dir/fix.patch" ] || [ ! -f "$dir/manifest.json" ]; then
                status="MISSING"
            elif ! pair_cached "$i" "$variant" "$KEY_V"; then
                status="STALE"
            else
                bo="$(build_id "$o")"; bn="$(build_id "$n")"
                if [ -z "$bo" ] || [ -z "$bn" ]; then status="NO-BUILD-ID"
                elif cmp -s "$o" "$n" || [ "$bo" = "$bn" ]; then status="IDENTICAL"
                elif ! binary_runs "$o" || ! binary_runs "$n"; then status="$(tr a-z A-Z <<<"$PKG")-V-FAILS"
                elif ! has_debug_info "$o" || ! has_debug_info "$n"; then status="NO-DEBUG-INFO"
                elif ! is_pie "$o" || ! is_pie "$n"; then status="NOT-PIE"
                fi
                if [ "$(text_hash "$o")" = "$(text_hash "$n")" ]; then code="same"; else code="changed"; fi
            fi
            [ "$status" = ok ] || bad=$((bad + 1))
            rows+=("$(printf '%-22s %-32s %-9s %-8s %-8s %-14s %s' "$(patch_name "$i")" "$(patch_cves "$i" | tr ' ' ',')" \
                "$variant" "$status" "$code" "${bo:0:12}" "${bn:0:12}")")
        done
    done
    echo
    echo "$PKG $VERSION corpus in $OUT"
    printf '%-22s %-32s %-9s %-8s %-8s %-14s %s\n' PATCH CVE VARIANT CHECK .TEXT OLD-BUILD-ID NEW-BUILD-ID
    printf '%s\n' "${rows[@]}"
    local total=$(( ${#SEC[@]} * $(wc -w <<<"$VARIANTS") ))
    echo "$((total - bad)) of $total pairs checked ok"
    return "$bad"
}

write_index() {
    local first=1 variant i
    {
        echo "{"
        echo "  \"package\": $(json_str "$PKG"),"
        echo "  \"debian_version\": $(json_str "$VERSION"),"
        echo "  \"series\": $(json_list "${SERIES[@]}"),"
        echo "  \"pairs\": ["
        for variant in hardened lto; do
            prepare_variant "$variant"
            for i in "${SEC[@]}"; do
                pair_cached "$i" "$variant" "$KEY_V" || continue
                [ "$first" = 1 ] || echo ","
                first=0
                printf '    {"name": %s, "variant": %s, "cve": %s, "dir": %s}' "$(json_str "$(patch_name "$i")")" \
                    "$(json_str "$variant")" "$(json_list $(patch_cves "$i"))" "$(json_str "$(pair_dir "$i" "$variant")")"
            done
        done
        echo
        echo "  ]"
        echo "}"
    } >"$OUT/index.json.tmp"
    mv "$OUT/index.json.tmp" "$OUT/index.json"
}

# --- the steps every package's main shares (nginx here, build-<pkg>.sh for the others) ---------

# The cache directory of the version `--print` names: the asked-for, else the pinned, else the
# first cached version, else the pinned one.
package_dir() {
    local v="${1:-}"
    [ -n "$v" ] || v="$(cached_versions | grep -Fx "$PINNED_VERSION" || true)"
    [ -n "$v" ] || v="$(cached_versions | sed -n 1p)"
    [ -n "$v" ] || v="$PINNED_VERSION"
    echo "$CACHE/$PKG-$v"
}

# Take the package's lock, get its source package (and build dependencies) and read its series;
# sets OUT, VERSION, SERIES, SEC and T_START. `want` is the asked-for version, or empty.
package_start() {
    local want="$1"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/$LOCK_NAME"
    flock 9
    T_START="$(now)"
    # A complete corpus of the pinned (or asked-for) version needs neither apt nor the network.
    if [ -z "$want" ] && [ -f "$CACHE/$PKG-$PINNED_VERSION/index.json" ] && [ -f "$CACHE/src/${PKG}_$PINNED_VERSION/.extracted" ]; then
        want="$PINNED_VERSION"
    fi
    if [ -n "$want" ] && [ -f "$CACHE/src/${PKG}_$want/.extracted" ]; then
        install_build_deps
    else
        enable_deb_src
        install_build_deps
    fi
    fetch_source "$want"
    OUT="$CACHE/$PKG-$VERSION"
    mkdir -p "$OUT"
    read_series
    [ ${#SEC[@]} -gt 0 ] || die "no security patch (CVE in name or header) in $SRCDIR/debian/patches/series"
    log "$PKG $VERSION: ${#SERIES[@]} patches in series, ${#SEC[@]} security patches:"
    local i
    for i in "${!SERIES[@]}"; do
        if [[ " ${SEC[*]} " == *" $i "* ]]; then
            log "  [$i] ${SERIES[$i]}  $(patch_cves "$i")  ($(patch_files "$i" | tr '\n' ' ' | sed 's/ $//'))"
        else
            log "  [$i] ${SERIES[$i]}  (not a security patch; applied in order)"
        fi
    done
}

# Build every variant (CONFIGURE_ARGS set), check the pairs and write the index when all pass.
# Leaves the number of failed pairs in PACKAGE_FAILED.
package_build() {
    local variant
    for variant in $VARIANTS; do
        local t0; t0="$(now)"
        build_variant "$variant"
        log "$variant: done in $(( $(now) - t0 ))s"
    done
    PACKAGE_FAILED=0
    check_all || PACKAGE_FAILED=$?
    [ "$PACKAGE_FAILED" -eq 0 ] && write_index
    log "total $(( $(now) - T_START ))s"
}

# --- main ---------------------------------------------------------------------------------------
main() {
    local want="${LIVEPATCH_NGINX_VERSION:-}"
    if [ "${1:-}" = "--print" ]; then
        package_dir "$want"
        return 0
    fi
    [ $# -eq 0 ] || { log "usage: $0 [--print]"; exit 2; }
    package_start "$want"
    mapfile -t CONFIGURE_ARGS < <({
        echo --error-log-path=stderr
        echo --with-http_ssl_module
        module_options
    } | awk '!seen[$0]++')
    package_build
    local rc="$PACKAGE_FAILED"
    # The second daemon of the corpus (tests/corpus/build-dnsmasq.sh), under its own lock.
    local rc2=0
    if [ "${LIVEPATCH_CORPUS_DNSMASQ:-1}" != 0 ]; then
        exec 9>&-
        "$ROOT/tests/corpus/build-dnsmasq.sh" || rc2=$?
    fi
    [ "$rc" -eq 0 ] || die "$rc pair(s) failed the checks"
    [ "$rc2" -eq 0 ] || die "tests/corpus/build-dnsmasq.sh failed"
}

# Sourced by build-<pkg>.sh for the helpers above; run only when executed.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
