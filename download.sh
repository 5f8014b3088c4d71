#!/usr/bin/env bash
# Download the Llama 2 weights with the signed link that Meta e-mails to
# approved users.  Run "./download.sh --help" for usage.
#
# Every file is written to NAME.part first, checked (md5 checksum from the
# release's checklists, or at least "not an HTML error page" for the two text
# files that have no checksum), and only then renamed to NAME.  A re-run skips
# files that already verify and resumes .part files with HTTP range requests.
#
# Written for bash 3.2 or later (macOS ships 3.2): no associative arrays,
# no ${var,,}, no mapfile.

set -u
set -f            # no pathname expansion anywhere: URLs may contain '*' and '?'
set -o pipefail

PROG=${0##*/}

ALL_MODELS="7B 13B 70B 7B-chat 13B-chat 70B-chat"
REQUEST_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"

EXIT_FAILED=1     # some file could not be downloaded or verified
EXIT_USAGE=2      # bad option, URL or model name; missing tool: nothing downloaded

usage() {
    cat <<EOF
Usage: $PROG [options] [URL]

Download Llama 2 model weights using the signed link Meta e-mailed you
(https://<host>/*?Policy=...&Signature=...&Key-Pair-Id=...).  Each file is
fetched by replacing the '*' with its path.  Links expire after 24 hours and
allow a limited number of downloads; request a new one at
  $REQUEST_PAGE

Options:
  -u, --url URL          the signed link (quote it: it contains '&').
                         Also accepted as the only positional argument.
  -m, --models LIST      comma-separated models, or 'all':
                         7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat
                         (case does not matter; llama-2-7b style names work too)
  -d, --target-dir DIR   where to put the files (default: current directory)
      --downloader TOOL  use 'wget' or 'curl' (default: wget if installed,
                         otherwise curl)
      --retries N        times to resume a file after a network error
                         (default: 5)
  -q, --quiet            no progress bars
      --non-interactive  never prompt; fail if the URL or models are missing
  -h, --help             show this help

Environment (used when the matching option is not given):
  PRESIGNED_URL          the signed link
  MODEL_SIZE             the model list, e.g. "7B,13B-chat" or "all"
  TARGET_FOLDER          the target directory
  DOWNLOADER             wget or curl
  LLAMA_DOWNLOAD_RETRY_WAIT  seconds to wait before resuming after a network
                         error (default: 5)

Without --url/--models (or the variables) the script asks for them, like the
original download.sh: paste the link, then type the models (Enter = all).
The answers can also be piped in, one per line.

Files written:
  DIR/LICENSE, DIR/USE_POLICY.md, DIR/tokenizer.model,
  DIR/tokenizer_checklist.chk, and for each model (e.g. 7B -> llama-2-7b):
  DIR/llama-2-7b/consolidated.00.pth ... (1, 2 or 8 shards for 7B, 13B, 70B),
  DIR/llama-2-7b/params.json, DIR/llama-2-7b/checklist.chk

Every shard, params.json and tokenizer.model is checked against the md5
checksums in the release's checklists (md5sum on Linux, md5 on macOS).
Downloads go to NAME.part and are renamed only once verified.  Running the
same command again skips verified files and resumes partial ones, so after
any failure or Ctrl-C just run it again (with a new link if yours expired).

Exit status: 0 all files verified; 1 some file failed (see the summary);
2 bad usage, URL or model name, or a missing tool; 130 interrupted.

Examples:
  $0
  $0 --url 'https://download.llamameta.net/*?Policy=...' --models 7B,7B-chat
  PRESIGNED_URL='https://...' MODEL_SIZE=70B TARGET_FOLDER=/data/llama $0
EOF
}

# ---------------------------------------------------------------- messages

say()  { printf '%s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
err()  { printf 'error: %s\n' "$*" >&2; }
die_usage() {
    err "$@"
    exit "$EXIT_USAGE"
}

# ---------------------------------------------------------------- options

OPT_URL=""
OPT_MODELS=""
OPT_TARGET=""
OPT_DOWNLOADER=""
OPT_RETRIES=""
HAVE_URL=0
HAVE_MODELS=0
HAVE_TARGET=0
QUIET=0
NON_INTERACTIVE=0

need_value() {  # option-name remaining-argument-count
    if [ "$2" -lt 2 ]; then
        die_usage "$1 needs a value (see --help)"
    fi
}

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            -h|--help) usage; exit 0 ;;
            -u|--url) need_value "$1" $#; OPT_URL=$2; HAVE_URL=1; shift ;;
            --url=*) OPT_URL=${1#*=}; HAVE_URL=1 ;;
            -m|--models|--model) need_value "$1" $#; OPT_MODELS=$2; HAVE_MODELS=1; shift ;;
            --models=*|--model=*) OPT_MODELS=${1#*=}; HAVE_MODELS=1 ;;
            -d|--target-dir|--target) need_value "$1" $#; OPT_TARGET=$2; HAVE_TARGET=1; shift ;;
            --target-dir=*|--target=*) OPT_TARGET=${1#*=}; HAVE_TARGET=1 ;;
            --downloader) need_value "$1" $#; OPT_DOWNLOADER=$2; shift ;;
            --downloader=*) OPT_DOWNLOADER=${1#*=} ;;
            --retries) need_value "$1" $#; OPT_RETRIES=$2; shift ;;
            --retries=*) OPT_RETRIES=${1#*=} ;;
            -q|--quiet) QUIET=1 ;;
            --non-interactive) NON_INTERACTIVE=1 ;;
            --) shift; break ;;
            -*) die_usage "unknown option '$1' (see --help)" ;;
            *)
                if [ "$HAVE_URL" = 1 ]; then
                    die_usage "unexpected argument '$1': give the URL once, quoted (see --help)"
                fi
                OPT_URL=$1; HAVE_URL=1 ;;
        esac
        shift
    done
    if [ $# -gt 0 ]; then
        if [ "$HAVE_URL" = 1 ] || [ $# -gt 1 ]; then
            die_usage "unexpected argument '$1' (see --help)"
        fi
        OPT_URL=$1; HAVE_URL=1
    fi
}

# ---------------------------------------------------------------- tools

DOWNLOADER_ENV=${DOWNLOADER:-}   # the environment's choice, before reuse
DOWNLOADER=""                    # the tool in use: wget or curl
MD5_TOOL=""

have() { command -v "$1" >/dev/null 2>&1; }

pick_downloader() {
    local want=${OPT_DOWNLOADER:-${DOWNLOADER_ENV:-}}
    case $want in
        "")
            if have wget; then DOWNLOADER=wget
            elif have curl; then DOWNLOADER=curl
            else
                die_usage "neither wget nor curl is installed (wget: not found, curl: not found). Install one of them, e.g. 'sudo apt-get install wget' or 'brew install wget', and run this again."
            fi ;;
        wget|curl)
            if ! have "$want"; then
                die_usage "$want was requested but is not installed (not found in PATH). Install it, or choose the other one with --downloader."
            fi
            DOWNLOADER=$want ;;
        *) die_usage "--downloader must be 'wget' or 'curl', not '$want'" ;;
    esac
}

pick_md5() {
    if have md5sum; then MD5_TOOL=md5sum
    elif have md5; then MD5_TOOL=md5
    elif have openssl; then MD5_TOOL=openssl
    else
        die_usage "no MD5 tool found (md5sum, md5 or openssl), so checksums cannot be verified. Install coreutils (md5sum) and run this again."
    fi
}

# ---------------------------------------------------------------- small helpers

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

trim() {  # prints $1 without leading/trailing whitespace (including CR)
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

SIZE=0
file_size() {  # sets SIZE to the size of regular file $1, 0 if absent
    SIZE=0
    if [ -f "$1" ]; then
        SIZE=$(wc -c < "$1" 2>/dev/null) || SIZE=0
        SIZE=$((SIZE + 0))
    fi
}

MD5=""
md5_of() {  # sets MD5 to the lowercase md5 of file $1; fails if it cannot
    local out hash
    case $MD5_TOOL in
        md5sum) out=$(md5sum < "$1") ;;
        md5) out=$(md5 -r "$1") ;;
        openssl) out=$(openssl dgst -md5 -r "$1") ;;
    esac || return 1
    hash=${out%%[[:space:]]*}
    MD5=$(lower "$hash")
    case $MD5 in
        *[!0-9a-f]*|"") return 1 ;;
    esac
    [ ${#MD5} -eq 32 ]
}

looks_like_html() {  # true if file $1 starts like a web page or an XML error
    local head
    [ -f "$1" ] || return 1
    head=$(head -c 512 "$1" 2>/dev/null | tr -d '\000' | tr '[:upper:]' '[:lower:]')
    head=$(trim "$head")
    case $head in
        '<!doctype html'*|'<html'*|'<head'*|'<body'*|'<?xml'*|'<error'*) return 0 ;;
    esac
    return 1
}

human_kb() {  # KiB -> "12.3 GB"-style text (1 decimal)
    local kb=$1
    if [ "$kb" -ge 1048576 ]; then
        printf '%d.%d GB' $((kb / 1048576)) $((kb % 1048576 * 10 / 1048576))
    else
        printf '%d MB' $((kb / 1024))
    fi
}

free_kb() {  # free KiB on the file system holding directory $1 (empty if unknown)
    df -Pk "$1" 2>/dev/null | {
        read -r _ || exit 0
        read -r _ _ _ avail _ || exit 0
        printf '%s' "$avail"
    }
}

# ---------------------------------------------------------------- models

MODELS=()        # normalized names, e.g. 7B-chat

model_dir() {  # 7B-chat -> llama-2-7b-chat
    printf 'llama-2-%s' "$(lower "$1")"
}

model_shards() {
    case $1 in
        7B|7B-chat) echo 1 ;;
        13B|13B-chat) echo 2 ;;
        70B|70B-chat) echo 8 ;;
    esac
}

model_size_gb() {  # approximate size on disk
    case $1 in
        7B|7B-chat) echo 13 ;;
        13B|13B-chat) echo 25 ;;
        70B|70B-chat) echo 129 ;;
    esac
}

normalize_model() {  # prints the canonical name or nothing
    local m
    m=$(lower "$1")
    m=${m#llama-2-}
    m=${m#llama2-}
    case $m in
        7b) echo 7B ;;
        13b) echo 13B ;;
        70b) echo 70B ;;
        7b-chat|7bchat|7b_chat) echo 7B-chat ;;
        13b-chat|13bchat|13b_chat) echo 13B-chat ;;
        70b-chat|70bchat|70b_chat) echo 70B-chat ;;
    esac
}

parse_models() {  # "7B, 13B-chat" -> MODELS; rejects unknown names
    local list items item name seen bad=""
    list=$(trim "$1")
    if [ -z "$list" ] || [ "$(lower "$list")" = all ]; then
        list=$ALL_MODELS
    fi
    IFS=', ' read -r -a items <<< "$list"
    MODELS=()
    seen=" "
    for item in ${items[@]+"${items[@]}"}; do
        [ -n "$item" ] || continue
        name=$(normalize_model "$item")
        if [ -z "$name" ]; then
            bad="$bad${bad:+, }'$item'"
            continue
        fi
        case $seen in
            *" $name "*) ;;
            *) MODELS+=("$name"); seen="$seen$name " ;;
        esac
    done
    if [ -n "$bad" ]; then
        die_usage "unknown model $bad. Choose from: ${ALL_MODELS// /, } (comma-separated), or 'all'. Nothing was downloaded."
    fi
    if [ ${#MODELS[@]} -eq 0 ]; then
        die_usage "no model chosen. Use e.g. --models 7B,13B-chat or --models all."
    fi
}

# ---------------------------------------------------------------- URL

URL=""
URL_PREFIX=""
URL_SUFFIX=""

url_host() {  # prints the lowercase host of URL $1
    local rest=${1#*://}
    rest=${rest%%[/?#]*}
    rest=${rest##*@}
    rest=${rest%%:*}
    lower "$rest"
}

check_url() {
    local url host scheme
    url=$(trim "$1")
    # Strip quotes or angle brackets that came along with a copy-paste.
    case $url in
        \"*\"|\'*\'|\<*\>) url=${url:1:${#url}-2} ;;
    esac
    url=$(trim "$url")
    if [ -z "$url" ]; then
        die_usage "no download URL given. Paste the link from Meta's e-mail (it starts with https:// and contains '*?Policy=')."
    fi
    case $url in
        *[[:space:]]*)
            die_usage "the URL contains spaces or line breaks; it was probably split across lines when copied. Copy the whole link again as one line." ;;
    esac
    scheme=$(lower "${url%%://*}")
    if [ "$url" = "${url#*://}" ] || { [ "$scheme" != https ] && [ "$scheme" != http ]; }; then
        die_usage "'${url:0:40}...' is not a web link. Paste the URL from Meta's e-mail; it starts with https://."
    fi
    host=$(url_host "$url")
    case $host in
        l.facebook.com|lm.facebook.com|l.messenger.com|l.instagram.com|\
        facebook.com|www.facebook.com|m.facebook.com|\
        *.safelinks.protection.outlook.com|urldefense.com|*.urldefense.com|\
        urldefense.proofpoint.com|*.mimecast.com|*.mimecastprotect.com|\
        google.com|www.google.com|t.co|lnkd.in)
            die_usage "this link goes through the redirect host '$host', which wraps the real download link, so it cannot be used to fetch files. In Meta's e-mail, select and copy the URL text itself (it looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...) rather than copying the link behind it, and run this again." ;;
    esac
    case $url in
        *\?*) ;;
        *) url="$url?" ;;   # no query: simplifies the checks below
    esac
    local path=${url%%\?*} query=${url#*\?}
    if [ "$path" = "${path#*\*}" ]; then
        case $path in
            *%2[Aa]*)
                # Some mail clients encode the '*' placeholder as %2A.
                local before=${path%%%2[Aa]*}
                path="$before*${path#"$before"%2?}"
                ;;
            *)
                die_usage "the URL has no '*' placeholder. The link from Meta looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=... and the script replaces the '*' with each file's name. Copy the complete link from the e-mail again (not the address of a single file)." ;;
        esac
    fi
    case $query in
        *Policy=*)
            case $query in
                *Signature=*Key-Pair-Id=*|*Key-Pair-Id=*Signature=*) ;;
                *) die_usage "the URL has Policy= but not both Signature= and Key-Pair-Id=: it was cut off when copied. Copy the complete link from the e-mail again." ;;
            esac ;;
        "") warn "the URL has no Policy/Signature parameters; trying it anyway" ;;
    esac
    URL_PREFIX=${path%%\**}
    URL_SUFFIX=${path#*\*}
    if [ -n "$query" ]; then
        URL_SUFFIX="$URL_SUFFIX?$query"
    fi
    URL="$URL_PREFIX*$URL_SUFFIX"
}

file_url() {  # URL for release path $1 (e.g. llama-2-7b/params.json)
    printf '%s%s%s' "$URL_PREFIX" "$1" "$URL_SUFFIX"
}

# ---------------------------------------------------------------- prompting

ask() {  # prompt variable: reads one line from stdin; fails on end of input
    local prompt=$1 line="" rc
    if [ "$NON_INTERACTIVE" = 1 ]; then
        return 1
    fi
    printf '%s' "$prompt" >&2
    IFS= read -r line
    rc=$?
    if [ ! -t 0 ]; then
        printf '\n' >&2    # the answer was not echoed by a terminal
    fi
    if [ $rc -ne 0 ] && [ -z "$line" ]; then
        return 1
    fi
    printf -v "$2" '%s' "$line"
}

# ---------------------------------------------------------------- downloading

TMP_DIR=""
LOG_FILE=""
DL_RC=0
DL_HTTP=""

run_wget() {  # url output progress(0/1)
    local -a args
    args=(--no-verbose --server-response "--output-file=$LOG_FILE" --continue
          --tries=1 --connect-timeout=30 --read-timeout=120
          "--output-document=$2")
    if [ "$3" = 1 ]; then
        # "force": wget would pick the dot style, its log being a file.
        args+=(--show-progress --progress=bar:force:noscroll)
    fi
    : > "$LOG_FILE"
    LC_ALL=C wget "${args[@]}" -- "$1"
    DL_RC=$?
    DL_HTTP=""
    local first second rest
    while read -r first second rest; do
        case $first in
            HTTP/*) DL_HTTP=$second ;;
        esac
    done < "$LOG_FILE"
}

run_curl() {  # url output progress(0/1)
    local -a args
    args=(--globoff --location --fail --continue-at - --connect-timeout 30
          --speed-limit 1 --speed-time 120 --output "$2" --write-out '%{http_code}')
    if [ "$3" = 1 ]; then
        args+=(--progress-bar)
    else
        args+=(--silent)
    fi
    DL_HTTP=$(curl "${args[@]}" --url "$1")
    DL_RC=$?
    case $DL_HTTP in
        000|"") DL_HTTP="" ;;
    esac
}

# Classify the last transfer into DL_KIND:
#   ok       the server sent the (rest of the) file
#   complete the server says there is nothing left to send (416)
#   norange  the server refused to resume: start the file again
#   http     an HTTP error status (DL_HTTP)
#   net      connection problem: worth resuming
#   disk     could not write the file
#   tls      certificate problem
#   other    anything else (DL_RC)
DL_KIND=""
classify() {
    DL_KIND=other
    if [ "$DOWNLOADER" = wget ]; then
        case $DL_RC in
            0) DL_KIND=ok; [ "$DL_HTTP" = 416 ] && DL_KIND=complete ;;
            3) DL_KIND=disk ;;
            4) DL_KIND=net ;;
            5) DL_KIND=tls ;;
            8) DL_KIND=http; [ "$DL_HTTP" = 416 ] && DL_KIND=complete ;;
        esac
        if [ "$DL_RC" != 0 ] && grep -q 'Continued download failed' "$LOG_FILE" 2>/dev/null; then
            DL_KIND=norange
        fi
    else
        case $DL_RC in
            0) DL_KIND=ok ;;
            22) DL_KIND=http; [ "$DL_HTTP" = 416 ] && DL_KIND=complete ;;
            33|36) DL_KIND=norange ;;
            23) DL_KIND=disk ;;
            5|6|7|16|18|28|52|55|56|92) DL_KIND=net ;;
            35|51|58|59|60|77|80|83|90|91) DL_KIND=tls ;;
        esac
    fi
}

# Per-run bookkeeping for the summary.
FETCHED=()      # downloaded and verified against a checksum
UNCHECKED=()    # downloaded, no checksum published (LICENSE, USE_POLICY.md)
SKIPPED=()      # already present and verified
FAILED=()       # "path: reason"
FATAL=0         # stop downloading: later files would fail the same way
CURRENT=""      # release path being downloaded, for the Ctrl-C message
INTERRUPTED=0

fail_file() {  # path reason
    FAILED+=("$1: $2")
}

# Download release path $1 to local file $2.part (resuming it when possible).
# $3 = 1 to show progress.  Returns 0 when $2.part holds the server's full
# answer; otherwise prints what to do, records the failure and returns 1.
# Sets RESUMED=1 if any bytes were kept from before this call.
RESUMED=0
fetch_part() {
    local rel=$1 part=$2.part progress=$3 url attempt=0 max_attempts waited had
    url=$(file_url "$rel")
    max_attempts=$((RETRIES + 1))
    RESUMED=0
    CURRENT=$rel
    if [ -L "$part" ] || [ -e "$part" ]; then
        if looks_like_html "$part"; then
            rm -f "$part"
        fi
    fi
    while :; do
        attempt=$((attempt + 1))
        file_size "$part"
        had=$SIZE
        if [ "$had" -gt 0 ]; then
            RESUMED=1
            say "Resuming $rel from byte $SIZE"
        else
            say "Downloading $rel"
        fi
        if [ "$DOWNLOADER" = wget ]; then
            run_wget "$url" "$part" "$progress"
        else
            run_curl "$url" "$part" "$progress"
        fi
        classify
        case $DL_KIND in
            ok|complete)
                CURRENT=""
                return 0 ;;
            norange)
                if [ "$had" -gt 0 ]; then
                    # Not a failed attempt: the restart asks for no range.
                    say "The server does not support resuming $rel; starting it again from the beginning."
                    rm -f "$part"
                    RESUMED=0
                    attempt=$((attempt - 1))
                    continue
                fi
                err "$DOWNLOADER could not fetch $rel (exit status $DL_RC)."
                fail_file "$rel" "$DOWNLOADER exit status $DL_RC" ;;
            net)
                if [ $attempt -lt $max_attempts ]; then
                    waited=${LLAMA_DOWNLOAD_RETRY_WAIT:-5}
                    say "Connection problem while downloading $rel (${DOWNLOADER} exit status $DL_RC); resuming in ${waited}s (attempt $((attempt + 1)) of $max_attempts)."
                    sleep "$waited"
                    continue
                fi
                file_size "$part"
                err "could not download $rel: the connection failed $attempt time(s). Check your network connection. The $SIZE bytes received so far are kept in $part; run the same command again to resume."
                fail_file "$rel" "network error (partial file kept for resuming)"
                FATAL=1 ;;
            http)
                # wget creates its output file even for an error answer.
                file_size "$part"
                if [ "$SIZE" -eq 0 ]; then
                    rm -f "$part"
                fi
                case $DL_HTTP in
                    403)
                        err "the server refused $rel with 403 Forbidden. Your download link has expired (links are valid for 24 hours) or has reached its download limit, or it was not copied completely. Request a new link at $REQUEST_PAGE and run this script again with it: files already verified are kept and will not be downloaded again."
                        fail_file "$rel" "403 Forbidden (link expired or download limit reached)"
                        FATAL=1 ;;
                    404)
                        err "$rel was not found on the server (404). Check that your link is for Llama 2 and covers this model, and that the whole link was copied."
                        fail_file "$rel" "404 Not Found" ;;
                    408|429|500|502|503|504)
                        if [ $attempt -lt $max_attempts ]; then
                            waited=${LLAMA_DOWNLOAD_RETRY_WAIT:-5}
                            say "The server answered $DL_HTTP for $rel; trying again in ${waited}s (attempt $((attempt + 1)) of $max_attempts)."
                            sleep "$waited"
                            continue
                        fi
                        err "the server kept answering $DL_HTTP for $rel. Try again later; verified files are kept."
                        fail_file "$rel" "HTTP $DL_HTTP" ;;
                    *)
                        err "the server answered HTTP ${DL_HTTP:-error} for $rel."
                        fail_file "$rel" "HTTP ${DL_HTTP:-error}" ;;
                esac ;;
            disk)
                local free
                free=$(free_kb "$TARGET")
                err "could not write $part: the disk is probably full${free:+ ($(human_kb "$free") free)} or the directory is not writable. Free some space and run the same command again; the partial file is kept and the download will resume."
                fail_file "$rel" "could not write (disk full?)"
                FATAL=1 ;;
            tls)
                err "secure connection to $(url_host "$URL") failed while fetching $rel ($DOWNLOADER exit status $DL_RC): check the system clock and any proxy or antivirus that intercepts HTTPS."
                fail_file "$rel" "TLS/certificate error"
                FATAL=1 ;;
            *)
                err "$DOWNLOADER failed on $rel (exit status $DL_RC${DL_HTTP:+, HTTP $DL_HTTP})."
                fail_file "$rel" "$DOWNLOADER exit status $DL_RC" ;;
        esac
        CURRENT=""
        return 1
    done
}

# Download a file that has no published checksum (LICENSE, USE_POLICY.md).
get_unchecked() {  # release-path
    local rel=$1 dest="$TARGET/$1"
    if [ -f "$dest" ] && [ -s "$dest" ] && ! looks_like_html "$dest"; then
        SKIPPED+=("$rel")
        return 0
    fi
    rm -f "$dest.part"
    fetch_part "$rel" "$dest" 0 || return 1
    if ! [ -s "$dest.part" ] || looks_like_html "$dest.part"; then
        html_error "$rel" "$dest.part"
        return 1
    fi
    mv -f "$dest.part" "$dest" || { fail_file "$rel" "could not rename"; return 1; }
    UNCHECKED+=("$rel")
}

html_error() {  # release-path part-file
    rm -f "$2"
    err "the server sent a web page (or an empty answer) instead of $1; nothing was saved under that name. Your link may be wrong or expired, or a proxy or captive portal intercepted the download: open the link in a browser to see the message, or request a new link at $REQUEST_PAGE."
    fail_file "$1" "web page instead of the file"
}

# Checklist handling: "<md5>  <name>" lines, as written by md5sum.
CHK_NAMES=()
CHK_HASHES=()
CHK_ERROR=""
read_checklist() {  # file expected-name...: fills CHK_*; fails if malformed
    local file=$1 line hash name n=0 want found i
    local re='^([0-9A-Fa-f]{32})[[:space:]]+\*?(.+)$'
    shift
    CHK_NAMES=()
    CHK_HASHES=()
    CHK_ERROR=""
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        line=$(trim "$line")
        [ -n "$line" ] || continue
        if ! [[ $line =~ $re ]]; then
            CHK_ERROR="line $n is not '<md5>  <file name>': '${line:0:60}'"
            return 1
        fi
        hash=$(lower "${BASH_REMATCH[1]}")
        name=${BASH_REMATCH[2]#./}
        case $name in
            .*|*/*|*[!A-Za-z0-9._-]*)
                CHK_ERROR="line $n names an unexpected file '${name:0:60}'"
                return 1 ;;
        esac
        CHK_NAMES+=("$name")
        CHK_HASHES+=("$hash")
    done < "$file"
    if [ ${#CHK_NAMES[@]} -eq 0 ]; then
        CHK_ERROR="it lists no files"
        return 1
    fi
    for want in "$@"; do
        found=0
        i=0
        while [ $i -lt ${#CHK_NAMES[@]} ]; do
            if [ "${CHK_NAMES[$i]}" = "$want" ]; then found=1; break; fi
            i=$((i + 1))
        done
        if [ $found = 0 ]; then
            CHK_ERROR="it does not list $want"
            return 1
        fi
    done
}

get_checklist() {  # release-path expected-name...
    local rel=$1 dest="$TARGET/$1"
    shift
    if [ -f "$dest" ]; then
        if read_checklist "$dest" "$@"; then
            SKIPPED+=("$rel")
            return 0
        fi
        warn "the existing $rel is not a valid checksum list ($CHK_ERROR), probably an error page saved by an earlier attempt; downloading it again."
        rm -f "$dest"
    fi
    rm -f "$dest.part"
    fetch_part "$rel" "$dest" 0 || return 1
    if looks_like_html "$dest.part" || ! [ -s "$dest.part" ]; then
        html_error "$rel" "$dest.part"
        return 1
    fi
    if ! read_checklist "$dest.part" "$@"; then
        rm -f "$dest.part"
        err "the downloaded $rel is not a valid md5 checksum list ($CHK_ERROR), so nothing can be verified against it. Run this again; if it persists, request a new link at $REQUEST_PAGE."
        fail_file "$rel" "not a valid checksum list"
        return 1
    fi
    mv -f "$dest.part" "$dest" || { fail_file "$rel" "could not rename"; return 1; }
    FETCHED+=("$rel")
}

# Download release path $1 and check it against md5 $2.
get_verified() {  # release-path md5 progress
    local rel=$1 want=$2 progress=$3 dest="$TARGET/$1" fresh_retry=0
    if [ -f "$dest" ]; then
        [ "$progress" = 1 ] && say "Checking the existing $rel"
        if md5_of "$dest" && [ "$MD5" = "$want" ]; then
            SKIPPED+=("$rel")
            return 0
        fi
        # Not verified: e.g. a partial file left by the original script.
        # Continue it as the .part file (keep the larger of the two).
        local dsize
        file_size "$dest"; dsize=$SIZE
        file_size "$dest.part"
        if looks_like_html "$dest" || [ "$dsize" -le "$SIZE" ]; then
            rm -f "$dest"
        else
            say "The existing $rel does not match its checksum; treating it as a partial download."
            mv -f "$dest" "$dest.part"
        fi
    fi
    while :; do
        fetch_part "$rel" "$dest" "$progress" || return 1
        if looks_like_html "$dest.part"; then
            html_error "$rel" "$dest.part"
            return 1
        fi
        [ "$progress" = 1 ] && say "Verifying $rel"
        if ! md5_of "$dest.part"; then
            err "could not compute the md5 checksum of $dest.part with $MD5_TOOL."
            fail_file "$rel" "could not compute checksum"
            return 1
        fi
        if [ "$MD5" = "$want" ]; then
            break
        fi
        rm -f "$dest.part"
        if [ "$RESUMED" = 1 ] && [ $fresh_retry = 0 ]; then
            say "Checksum mismatch for $rel after resuming an earlier partial download; downloading it again from the start."
            fresh_retry=1
            continue
        fi
        err "checksum mismatch for $rel (expected $want, got $MD5). The damaged download was deleted; nothing was saved under that name. Run the same command again to download it again; if it keeps failing, request a new link."
        fail_file "$rel" "checksum mismatch"
        return 1
    done
    mv -f "$dest.part" "$dest" || { fail_file "$rel" "could not rename"; return 1; }
    FETCHED+=("$rel")
}

# Fetch checklist $2 in directory $1 (relative; "" for the top level), then
# every file it lists.  $3... are names the checklist must list.
get_listed_files() {
    local dir=$1 chk=$2 prefix="" i names hashes progress
    shift 2
    [ -n "$dir" ] && prefix="$dir/"
    if ! get_checklist "$prefix$chk" "$@"; then
        local want
        for want in "$@"; do
            fail_file "$prefix$want" "not attempted: no valid $chk"
        done
        return 1
    fi
    # Copy: get_verified must not see these change under it.
    names=("${CHK_NAMES[@]}")
    hashes=("${CHK_HASHES[@]}")
    i=0
    while [ $i -lt ${#names[@]} ]; do
        [ "$FATAL" = 1 ] && return 1
        case ${names[$i]} in
            *.pth) progress=$SHOW_PROGRESS ;;
            *) progress=0 ;;
        esac
        get_verified "$prefix${names[$i]}" "${hashes[$i]}" "$progress"
        i=$((i + 1))
    done
}

download_all() {
    local m dir shards i names
    for i in LICENSE USE_POLICY.md; do
        [ "$FATAL" = 1 ] && return
        get_unchecked "$i"
    done
    [ "$FATAL" = 1 ] && return
    get_listed_files "" tokenizer_checklist.chk tokenizer.model
    for m in "${MODELS[@]}"; do
        [ "$FATAL" = 1 ] && return
        dir=$(model_dir "$m")
        shards=$(model_shards "$m")
        say "== $m ($dir, $shards shard(s)) =="
        if ! mkdir -p "$TARGET/$dir"; then
            err "could not create $TARGET/$dir"
            fail_file "$dir" "could not create directory"
            continue
        fi
        names=()
        i=0
        while [ $i -lt "$shards" ]; do
            names+=("$(printf 'consolidated.%02d.pth' $i)")
            i=$((i + 1))
        done
        names+=(params.json)
        get_listed_files "$dir" checklist.chk "${names[@]}"
    done
}

# ---------------------------------------------------------------- summary

print_list() {  # title item...
    local title=$1
    shift
    printf '%s (%d):\n' "$title" $#
    local x
    for x in "$@"; do
        printf '  %s\n' "$x"
    done
}

summary() {
    local abs
    abs=$(cd "$TARGET" 2>/dev/null && pwd) || abs=$TARGET
    printf '\n==== Summary (%s, in %s) ====\n' "$DOWNLOADER" "$abs"
    print_list "Downloaded and verified" ${FETCHED[@]+"${FETCHED[@]}"}
    print_list "Already verified, skipped" ${SKIPPED[@]+"${SKIPPED[@]}"}
    print_list "Downloaded, no checksum published" ${UNCHECKED[@]+"${UNCHECKED[@]}"}
    print_list "Failed" ${FAILED[@]+"${FAILED[@]}"}
    if [ "$INTERRUPTED" = 1 ]; then
        printf 'Interrupted. Run the same command again to resume.\n'
    elif [ ${#FAILED[@]} -gt 0 ]; then
        if [ "$FATAL" = 1 ]; then
            printf 'Stopped early: the remaining files were not attempted.\n'
        fi
        printf 'Some files failed (see above). Fix the problem and run the same command again: verified files are kept and partial ones resume.\n'
    else
        printf 'All files are downloaded and verified.\n'
    fi
}

# ---------------------------------------------------------------- main

# shellcheck disable=SC2317  # run from the EXIT trap
cleanup() {
    if [ -n "$TMP_DIR" ]; then
        rm -rf "$TMP_DIR"
    fi
}

# shellcheck disable=SC2317  # run from the INT/TERM traps
on_signal() {  # exit-status
    trap '' INT TERM
    INTERRUPTED=1
    printf '\n' >&2
    if [ -n "$CURRENT" ]; then
        err "interrupted while downloading $CURRENT. What was received is kept in $TARGET/$CURRENT.part; run the same command again to resume."
    else
        err "interrupted."
    fi
    summary
    cleanup
    exit "$1"
}

check_space() {
    local need_kb=0 have_kb=0 free m dir shards i f
    for m in "${MODELS[@]}"; do
        need_kb=$((need_kb + $(model_size_gb "$m") * 1048576))
        dir=$(model_dir "$m")
        shards=$(model_shards "$m")
        i=0
        while [ $i -lt "$shards" ]; do
            f="$TARGET/$dir/$(printf 'consolidated.%02d.pth' $i)"
            file_size "$f"; have_kb=$((have_kb + SIZE / 1024))
            file_size "$f.part"; have_kb=$((have_kb + SIZE / 1024))
            i=$((i + 1))
        done
    done
    need_kb=$((need_kb - have_kb))
    free=$(free_kb "$TARGET")
    case $free in
        ""|*[!0-9]*) return 0 ;;
    esac
    if [ "$need_kb" -gt "$free" ]; then
        warn "about $(human_kb "$need_kb") more disk space is needed but only $(human_kb "$free") is free in $TARGET. The download will stop with a 'disk full' message when it runs out; free some space and run the same command again to resume."
    fi
}

main() {
    parse_args "$@"
    pick_downloader
    pick_md5

    RETRIES=${OPT_RETRIES:-5}
    case $RETRIES in
        ""|*[!0-9]*) die_usage "--retries needs a whole number, not '$RETRIES'" ;;
    esac
    case ${LLAMA_DOWNLOAD_RETRY_WAIT:-5} in
        *[!0-9]*) die_usage "LLAMA_DOWNLOAD_RETRY_WAIT must be a whole number of seconds" ;;
    esac

    local url_in models_in
    if [ "$HAVE_URL" = 1 ]; then
        url_in=$OPT_URL
    elif [ -n "${PRESIGNED_URL:-}" ]; then
        url_in=$PRESIGNED_URL
    elif ! ask "Enter the URL from email: " url_in; then
        die_usage "no download URL given. Pass it with --url 'URL' or PRESIGNED_URL, or paste it when asked."
    fi
    check_url "$url_in"

    if [ "$HAVE_MODELS" = 1 ]; then
        models_in=$OPT_MODELS
        if [ -z "$(trim "$models_in")" ]; then
            die_usage "--models is empty. Use e.g. --models 7B,13B-chat or --models all."
        fi
    elif [ -n "${MODEL_SIZE:-}" ]; then
        models_in=$MODEL_SIZE
    elif ! ask "Enter the list of models to download, comma-separated (${ALL_MODELS// /,}), or press Enter for all: " models_in; then
        die_usage "no models chosen. Pass them with --models 7B,13B-chat (or --models all) or MODEL_SIZE, or type them when asked."
    fi
    parse_models "$models_in"

    if [ "$HAVE_TARGET" = 1 ]; then
        TARGET=$OPT_TARGET
    else
        TARGET=${TARGET_FOLDER:-.}
    fi
    [ -n "$TARGET" ] || TARGET=.
    case $TARGET in
        -*) TARGET="./$TARGET" ;;
    esac
    if ! mkdir -p "$TARGET" || ! [ -w "$TARGET" ]; then
        die_usage "cannot create or write to the target directory '$TARGET'."
    fi

    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX") ||
        die_usage "cannot create a temporary directory (is TMPDIR writable?)"
    LOG_FILE="$TMP_DIR/downloader.log"
    trap cleanup EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM

    SHOW_PROGRESS=1
    [ "$QUIET" = 1 ] && SHOW_PROGRESS=0

    local total_gb=0 m
    for m in "${MODELS[@]}"; do
        total_gb=$((total_gb + $(model_size_gb "$m")))
    done
    say "Downloading ${MODELS[*]} (about $total_gb GB) from $(url_host "$URL") with $DOWNLOADER into $TARGET"
    check_space

    download_all
    summary
    if [ ${#FAILED[@]} -gt 0 ]; then
        exit "$EXIT_FAILED"
    fi
    exit 0
}

main "$@"
