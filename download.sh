#!/usr/bin/env bash
# Download the Llama 2 weights with Meta's signed link (see --help).  Each file goes to NAME.part, is checked
# (md5 from the release's checklists; LICENSE, USE_POLICY.md: not a web page), then renamed to NAME.
set -u -f -o pipefail   # -f: no pathname expansion, as URLs contain '*' and '?'.  Bash 3.2 or later.

ALL_MODELS="7B 13B 70B 7B-chat 13B-chat 70B-chat"
REQUEST_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"
DOWNLOADER_ENV=${DOWNLOADER:-}   # DOWNLOADER itself is reused for the tool in use
OPT_URL="" OPT_MODELS="" OPT_TARGET="" OPT_DOWNLOADER="" OPT_RETRIES=""
HAVE_URL=0 HAVE_MODELS=0 HAVE_TARGET=0 QUIET=0 NON_INTERACTIVE=0
FETCHED=() UNCHECKED=() SKIPPED=() FAILED=()   # for the summary; FAILED has "path: reason"
FATAL=0 INTERRUPTED=0 LOG_FILE=""   # FATAL=1: stop, as the remaining files would fail the same way
CURRENT=""   # release path being downloaded, for the Ctrl-C message

usage() {
    cat <<EOF
Usage: ${0##*/} [options] [URL]

Download the Llama 2 weights with the signed link Meta e-mailed you, of the form
https://<host>/*?Policy=...&Signature=...&Key-Pair-Id=...  Links expire after
24 hours and allow a limited number of downloads; request a new one at
  $REQUEST_PAGE

Options (in brackets: the environment variable used when one is not given):
  -u, --url URL          the signed link, quoted; or the only argument [PRESIGNED_URL]
  -m, --models LIST      comma-separated 7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat
                         (any case; llama-2-7b too), or 'all'          [MODEL_SIZE]
  -d, --target-dir DIR   where to put the files (default: .)        [TARGET_FOLDER]
      --downloader TOOL  wget or curl (default: wget if installed)     [DOWNLOADER]
      --retries N        times to resume a file after a network error (default 5),
                         after LLAMA_DOWNLOAD_RETRY_WAIT seconds (default 5)
  -q, --quiet            no progress bars
      --non-interactive  never prompt; fail if the URL or models are missing
  -h, --help             show this help
Without a URL or models the script asks for them (Enter = all models); the
answers can also be piped in, one per line.

Shards, params.json and tokenizer.model are checked against the release's md5
checklists (md5sum, or md5 on macOS); files are renamed from NAME.part only once
verified.  After any failure or Ctrl-C run the same command again (with a new
link if yours expired): verified files are skipped and partial ones resume.
Exit status: 0 all files verified; 1 some file failed (see the summary); 2 bad
usage, URL or model name, or a missing tool; 130 interrupted.
EOF
}

# Messages go to stderr: stdout carries only the help and the summary.
say()  { printf '%s\n' "$*" >&2; }
warn() { say "warning: $*"; }
err()  { say "error: $*"; }
die_usage() { err "$@"; exit 2; }   # bad usage, URL or model, missing tool: nothing downloaded
have() { command -v "$1" >/dev/null 2>&1; }
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }   # bash 3.2 has no ${x,,}
# Print the first of the commands $@ that is installed; fail if none is.
first_tool() { local t; for t; do if have "$t"; then printf '%s' "$t"; return 0; fi; done; return 1; }
# Print $1 without leading/trailing whitespace (a pasted CR included).
trim() { local s=${1#"${1%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
# Set SIZE to the byte size of regular file $1 (0 if there is none).
file_size() { SIZE=0; if [ -f "$1" ]; then SIZE=$(($(wc -c < "$1" 2>/dev/null) + 0)); fi; }
# Print the free KiB on the file system holding directory $1 (nothing if unknown).
free_kb() { df -Pk "$1" 2>/dev/null | { read -r _ && read -r _ _ _ avail _ && printf '%s' "$avail"; }; }
url_host() { local h=${1#*://}; h=${h%%[/?#]*}; h=${h##*@}; lower "${h%%:*}"; }   # of URL $1, lowercase
need_value() { [ "$2" -ge 2 ] || die_usage "$1 needs a value (see --help)"; }   # $2: arguments left

human_kb() {  # KiB -> "12.3 GB" or "512 MB", for the disk-space messages
    if [ "$1" -lt 1048576 ]; then printf '%d MB' $(($1 / 1024)); return; fi
    printf '%d.%d GB' $(($1 / 1048576)) $(($1 % 1048576 * 10 / 1048576))
}

md5_of() {  # set MD5 to file $1's md5 with MD5_TOOL (md5sum reads stdin: no file name to mangle)
    case $MD5_TOOL in
        md5sum) MD5=$(md5sum < "$1") ;;
        md5) MD5=$(md5 -r "$1") ;;
        *) MD5=$(openssl dgst -md5 -r "$1") ;;
    esac || return 1
    MD5=$(lower "${MD5%%[[:space:]]*}")
    [[ $MD5 =~ ^[0-9a-f]{32}$ ]]
}

looks_like_html() {  # true if file $1 starts like a web page or XML error (portal, proxy, CDN)
    [ -f "$1" ] || return 1
    case $(trim "$(head -c 512 "$1" 2>/dev/null | tr -d '\000' | tr '[:upper:]' '[:lower:]')") in
        '<!doctype html'*|'<html'*|'<head'*|'<body'*|'<?xml'*|'<error'*) return 0 ;;
    esac
    return 1
}

parse_args() {  # read the command line ("--opt value" or "--opt=value"); exit 2 on a bad option
    local arg
    while [ $# -gt 0 ]; do
        case $1 in --url=*|--models=*|--model=*|--target-dir=*|--target=*|--downloader=*|--retries=*)
            arg=$1; shift; set -- "${arg%%=*}" "${arg#*=}" "$@" ;;
        esac
        case $1 in
            -h|--help) usage; exit 0 ;;
            -q|--quiet) QUIET=1 ;;
            --non-interactive) NON_INTERACTIVE=1 ;;
            -u|--url) need_value "$1" $#; OPT_URL=$2 HAVE_URL=1; shift ;;
            -m|--models|--model) need_value "$1" $#; OPT_MODELS=$2 HAVE_MODELS=1; shift ;;
            -d|--target-dir|--target) need_value "$1" $#; OPT_TARGET=$2 HAVE_TARGET=1; shift ;;
            --downloader) need_value "$1" $#; OPT_DOWNLOADER=$2; shift ;;
            --retries) need_value "$1" $#; OPT_RETRIES=$2; shift ;;
            --) shift; break ;;   # what follows can only be the URL
            -*) die_usage "unknown option '$1' (see --help)" ;;
            *) [ "$HAVE_URL" = 0 ] || die_usage "unexpected argument '$1': give the URL once, quoted (see --help)"
               OPT_URL=$1 HAVE_URL=1 ;;
        esac
        shift
    done
    [ $# -eq 0 ] && return
    { [ "$HAVE_URL" = 0 ] && [ $# -eq 1 ]; } || die_usage "unexpected argument '$1' (see --help)"
    OPT_URL=$1 HAVE_URL=1
}

# Choose DOWNLOADER (option, $DOWNLOADER, wget, curl) and MD5_TOOL; exit 2 if one is missing.
pick_tools() {
    DOWNLOADER=${OPT_DOWNLOADER:-$DOWNLOADER_ENV}
    case $DOWNLOADER in
        "") DOWNLOADER=$(first_tool wget curl) || die_usage "neither wget nor curl is installed (wget: not found, curl: not found). Install one of them, e.g. 'sudo apt-get install wget' or 'brew install wget', and run this again." ;;
        wget|curl) have "$DOWNLOADER" || die_usage "$DOWNLOADER was requested but is not installed (not found in PATH). Install it, or choose the other one with --downloader." ;;
        *) die_usage "--downloader must be 'wget' or 'curl', not '$DOWNLOADER'" ;;
    esac
    MD5_TOOL=$(first_tool md5sum md5 openssl) || die_usage "no MD5 tool found (md5sum, md5 or openssl), so checksums cannot be verified. Install coreutils (md5sum) and run this again."
}

ask() {  # prompt with $1 and read a line of stdin into variable $2; fail at end of input
    local line="" rc
    [ "$NON_INTERACTIVE" = 0 ] || return 1
    printf '%s' "$1" >&2
    IFS= read -r line; rc=$?
    [ -t 0 ] || printf '\n' >&2    # the answer was not echoed by a terminal
    [ $rc -eq 0 ] || [ -n "$line" ] || return 1
    printf -v "$2" '%s' "$line"
}

model_info() {  # set M_DIR, M_GB (approximate size on disk) and M_SHARDS (file names) for model $1
    local n i
    M_DIR="llama-2-$(lower "$1")" M_SHARDS=()
    case $1 in 7B*) n=1 M_GB=13 ;; 13B*) n=2 M_GB=25 ;; *) n=8 M_GB=129 ;; esac
    for ((i = 0; i < n; i++)); do M_SHARDS+=("$(printf 'consolidated.%02d.pth' "$i")"); done
}

# "7B, llama-2-13b_chat" ("" or "all": every model) -> MODELS (7B, 13B-chat, ...); exit 2 if unknown.
parse_models() {
    local list items item m seen=" " bad=""
    list=$(trim "$1")
    if [ -z "$list" ] || [ "$(lower "$list")" = all ]; then list=$ALL_MODELS; fi
    IFS=', ' read -r -a items <<< "$list"; MODELS=()
    for item in ${items[@]+"${items[@]}"}; do
        [ -n "$item" ] || continue
        m=$(lower "$item"); m=${m#llama-2-}; m=${m#llama2-}
        case $m in
            7b|13b|70b) m="${m%b}B" ;;
            7b[-_]chat|7bchat|13b[-_]chat|13bchat|70b[-_]chat|70bchat) m="${m%%b*}B-chat" ;;
            *) bad="$bad${bad:+, }'$item'"; continue ;;
        esac
        [[ $seen == *" $m "* ]] || { MODELS+=("$m"); seen="$seen$m "; }
    done
    [ -z "$bad" ] || die_usage "unknown model $bad. Choose from: ${ALL_MODELS// /, } (comma-separated), or 'all'. Nothing was downloaded."
    [ ${#MODELS[@]} -gt 0 ] || die_usage "no model chosen. Use e.g. --models 7B,13B-chat or --models all."
}

# Split the pasted link around its '*' into URL_PREFIX and URL_SUFFIX; exit 2 explaining a bad one.
check_url() {
    local url path query host before
    url=$(trim "$1")
    case $url in \"*\"|\'*\'|\<*\>) url=$(trim "${url:1:${#url}-2}") ;; esac   # pasted with quotes or <>
    [ -n "$url" ] || die_usage "no download URL given. Paste the link from Meta's e-mail (it starts with https:// and contains '*?Policy=')."
    [[ $url != *[[:space:]]* ]] || die_usage "the URL contains spaces or line breaks; it was probably split across lines when copied. Copy the whole link again as one line."
    [[ $(lower "$url") == http://* || $(lower "$url") == https://* ]] || die_usage "'${url:0:40}...' is not a web link. Paste the URL from Meta's e-mail; it starts with https://."
    host=$(url_host "$url")
    case $host in
        l.facebook.com|lm.facebook.com|l.messenger.com|l.instagram.com|facebook.com|www.facebook.com|\
        m.facebook.com|*.safelinks.protection.outlook.com|urldefense.com|*.urldefense.com|\
        urldefense.proofpoint.com|*.mimecast.com|*.mimecastprotect.com|google.com|www.google.com|t.co|lnkd.in)
            die_usage "this link goes through the redirect host '$host', which wraps the real download link, so it cannot be used to fetch files. In Meta's e-mail, select and copy the URL text itself (it looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...) rather than copying the link behind it, and run this again." ;;
    esac
    path=${url%%\?*}; query=${url#"$path"}; query=${query#\?}
    case $path in
        *\**) ;;
        *%2[Aa]*)   # some mail clients encode the '*' placeholder as %2A
            before=${path%%%2[Aa]*}; path="$before*${path#"$before"%2?}" ;;
        *) die_usage "the URL has no '*' placeholder. The link from Meta looks like https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=... and the script replaces the '*' with each file's name. Copy the complete link from the e-mail again (not the address of a single file)." ;;
    esac
    case $query in
        "") warn "the URL has no Policy/Signature parameters; trying it anyway" ;;
        *Signature=*Key-Pair-Id=*|*Key-Pair-Id=*Signature=*) ;;
        *Policy=*) die_usage "the URL has Policy= but not both Signature= and Key-Pair-Id=: it was cut off when copied. Copy the complete link from the e-mail again." ;;
    esac
    URL_PREFIX=${path%%\**}
    URL_SUFFIX=${path#*\*}${query:+?$query}
    URL="$URL_PREFIX*$URL_SUFFIX"
}

# Settle URL, MODELS and TARGET from options, environment or prompts; exit 2 if one is wrong.
read_inputs() {
    local url_in models_in
    if [ "$HAVE_URL" = 1 ]; then url_in=$OPT_URL
    elif [ -n "${PRESIGNED_URL:-}" ]; then url_in=$PRESIGNED_URL
    elif ! ask "Enter the URL from email: " url_in; then
        die_usage "no download URL given. Pass it with --url 'URL' or PRESIGNED_URL, or paste it when asked."
    fi
    check_url "$url_in"
    if [ "$HAVE_MODELS" = 1 ]; then models_in=$OPT_MODELS
        [ -n "$(trim "$models_in")" ] || die_usage "--models is empty. Use e.g. --models 7B,13B-chat or --models all."
    elif [ -n "${MODEL_SIZE:-}" ]; then models_in=$MODEL_SIZE
    elif ! ask "Enter the list of models to download, comma-separated (${ALL_MODELS// /,}), or press Enter for all: " models_in; then
        die_usage "no models chosen. Pass them with --models 7B,13B-chat (or --models all) or MODEL_SIZE, or type them when asked."
    fi
    parse_models "$models_in"
    TARGET=${TARGET_FOLDER:-.}; [ "$HAVE_TARGET" = 0 ] || TARGET=${OPT_TARGET:-.}
    [[ $TARGET != -* ]] || TARGET="./$TARGET"   # not to be taken for an option
    { mkdir -p "$TARGET" && [ -w "$TARGET" ]; } || die_usage "cannot create or write to the target directory '$TARGET'."
}

# Fetch URL $1 into file $2, resuming it ($3 = 1: progress bar).  Sets DL_RC, DL_HTTP and, from one table
# for both tools, DL_KIND: ok (416: nothing left), norange (won't resume), forbidden, missing, busy
# (retry), http (another status), dns (the host name does not resolve: no retry), net (resume), disk, tls
# or other.
transfer() {
    local key first second rest bar=()
    if [ "$DOWNLOADER" = wget ]; then   # "force": wget would choose dots, its log being a file
        [ "$3" = 1 ] && bar=(--show-progress --progress=bar:force:noscroll)
        : > "$LOG_FILE"
        LC_ALL=C wget --no-verbose --server-response "--output-file=$LOG_FILE" --continue --tries=1 \
            --connect-timeout=30 --read-timeout=120 "--output-document=$2" ${bar[@]+"${bar[@]}"} -- "$1"
        DL_RC=$? DL_HTTP="" key=wget:$DL_RC
        while read -r first second rest; do [[ $first == HTTP/* ]] && DL_HTTP=$second; done < "$LOG_FILE"
        if [ "$DL_RC" != 0 ] && grep -q 'Continued download failed' "$LOG_FILE"; then key=wget:norange; fi
        if [ "$DL_RC" = 4 ] && grep -q 'unable to resolve host address' "$LOG_FILE"; then key=wget:dns; fi
    else
        bar=(--silent); [ "$3" = 1 ] && bar=(--progress-bar)
        DL_HTTP=$(curl --globoff --location --fail --continue-at - --connect-timeout 30 --speed-limit 1 \
            --speed-time 120 --output "$2" --write-out '%{http_code}' "${bar[@]}" --url "$1")
        DL_RC=$? key=curl:$DL_RC
        [ "$DL_HTTP" != 000 ] || DL_HTTP=""
    fi
    case $key in wget:8|curl:22) key=http:$DL_HTTP ;; esac   # an HTTP error status
    case $key in
        *:0|http:416) DL_KIND=ok ;;
        http:403) DL_KIND=forbidden ;;
        http:404) DL_KIND=missing ;;
        http:408|http:429|http:500|http:502|http:503|http:504) DL_KIND=busy ;;
        http:*) DL_KIND=http ;;
        wget:norange|curl:33|curl:36) DL_KIND=norange ;;
        wget:dns|curl:5|curl:6) DL_KIND=dns ;;
        wget:3|curl:23) DL_KIND=disk ;;
        wget:4|curl:7|curl:16|curl:18|curl:28|curl:52|curl:55|curl:56|curl:92) DL_KIND=net ;;
        wget:5|curl:35|curl:51|curl:58|curl:59|curl:60|curl:77|curl:80|curl:83|curl:90|curl:91) DL_KIND=tls ;;
        *) DL_KIND=other ;;
    esac
}

# Record release path $1 as failed for reason $2 (for the summary); say why ($3) if given.
fail_file() { FAILED+=("$1: $2"); if [ $# -gt 2 ]; then err "$3"; fi; }

# Say why release path $1 (partial file $2, $3 attempts) failed; FATAL: the rest would fail too.
report_failure() {
    local rel=$1 part=$2 free
    case $DL_KIND in forbidden|dns|net|disk|tls) FATAL=1 ;; esac
    case $DL_KIND in
        forbidden) fail_file "$rel" "403 Forbidden (link expired or download limit reached)" "the server refused $rel with 403 Forbidden. Your download link has expired (links are valid for 24 hours) or has reached its download limit, or it was not copied completely. Request a new link at $REQUEST_PAGE and run this script again with it: files already verified are kept and will not be downloaded again." ;;
        missing) fail_file "$rel" "404 Not Found" "$rel was not found on the server (404). Check that your link is for Llama 2 and covers this model, and that the whole link was copied." ;;
        busy) fail_file "$rel" "HTTP $DL_HTTP" "the server kept answering $DL_HTTP for $rel. Try again later; verified files are kept." ;;
        http) fail_file "$rel" "HTTP ${DL_HTTP:-error}" "the server answered HTTP ${DL_HTTP:-error} for $rel." ;;
        dns) fail_file "$rel" "unknown host $(url_host "$URL")" "could not resolve the host name $(url_host "$URL") (fetching $rel): it does not exist, or this machine cannot reach a DNS server. Check that the whole link was copied from the e-mail and that you are online; retrying would not help, so nothing more is tried." ;;
        net) file_size "$part"
            fail_file "$rel" "network error (partial file kept for resuming)" "could not download $rel: the connection failed $3 time(s). Check your network connection. The $SIZE bytes received so far are kept in $part; run the same command again to resume." ;;
        disk) free=$(free_kb "$TARGET")
            fail_file "$rel" "could not write (disk full?)" "could not write $part: the disk is probably full${free:+ ($(human_kb "$free") free)} or the directory is not writable. Free some space and run the same command again; the partial file is kept and the download will resume." ;;
        tls) fail_file "$rel" "TLS/certificate error" "secure connection to $(url_host "$URL") failed while fetching $rel ($DOWNLOADER exit status $DL_RC): check the system clock and any proxy or antivirus that intercepts HTTPS." ;;
        norange) fail_file "$rel" "$DOWNLOADER exit status $DL_RC" "$DOWNLOADER could not fetch $rel (exit status $DL_RC)." ;;
        *) fail_file "$rel" "$DOWNLOADER exit status $DL_RC" "$DOWNLOADER failed on $rel (exit status $DL_RC${DL_HTTP:+, HTTP $DL_HTTP})." ;;
    esac
}

# Download release path $1 into its .part ($2 = 1: progress), resuming and retrying; true once
# complete, else the failure is reported.  RESUMED=1: bytes from before were kept.
fetch_part() {
    local rel=$1 part="$TARGET/$1.part" attempt=1 had pause=${LLAMA_DOWNLOAD_RETRY_WAIT:-5} note
    RESUMED=0 CURRENT=$rel
    if looks_like_html "$part"; then rm -f "$part"; fi
    while :; do
        file_size "$part"; had=$SIZE
        if [ "$had" -gt 0 ]; then RESUMED=1; say "Resuming $rel from byte $had"; else say "Downloading $rel"; fi
        transfer "$URL_PREFIX$rel$URL_SUFFIX" "$part" "$2"
        case $DL_KIND in forbidden|missing|busy|http|dns) [ -s "$part" ] || rm -f "$part" ;; esac   # wget's empty file
        if [ "$DL_KIND" = ok ]; then CURRENT=""; return 0; fi
        if [ "$DL_KIND" = norange ] && [ "$had" -gt 0 ]; then   # restarting is not a retry
            say "The server does not support resuming $rel; starting it again from the beginning."
            rm -f "$part"; RESUMED=0; continue
        fi
        if [[ $DL_KIND == net || $DL_KIND == busy ]] && [ "$attempt" -le "$RETRIES" ]; then
            attempt=$((attempt + 1))
            note="Connection problem while downloading $rel ($DOWNLOADER exit status $DL_RC); resuming"
            [ "$DL_KIND" = net ] || note="The server answered $DL_HTTP for $rel; trying again"
            say "$note in ${pause}s (attempt $attempt of $((RETRIES + 1)))."
            sleep "$pause"; continue
        fi
        CURRENT=""; report_failure "$rel" "$part" "$attempt"; return 1
    done
}

html_error() {  # record that the server sent a web page (or nothing) instead of release path $1
    rm -f "$TARGET/$1.part"
    fail_file "$1" "web page instead of the file" "the server sent a web page (or an empty answer) instead of $1; nothing was saved under that name. Your link may be wrong or expired, or a proxy or captive portal intercepted the download: open the link in a browser to see the message, or request a new link at $REQUEST_PAGE."
}

# True if $1 is a non-empty regular file that is not a web page.
is_real_text() { [ -f "$1" ] && [ -s "$1" ] && ! looks_like_html "$1"; }
# Rename the verified $TARGET/$1.part to its final name.
install_part() { mv -f "$TARGET/$1.part" "$TARGET/$1" || { fail_file "$1" "could not rename"; return 1; }; }
fetch_text() {  # download small text file $1 afresh into its .part; fail on a web page (no .part is kept:
    rm -f "$TARGET/$1.part"   # the next run fetches it afresh anyway)
    fetch_part "$1" 0 || { rm -f "$TARGET/$1.part"; return 1; }
    is_real_text "$TARGET/$1.part" || { html_error "$1"; return 1; }
}

get_unchecked() {  # download $1, a file with no published checksum (LICENSE, USE_POLICY.md)
    if is_real_text "$TARGET/$1"; then SKIPPED+=("$1"); return 0; fi
    fetch_text "$1" && install_part "$1" && UNCHECKED+=("$1")
}

# Load checklist $1 ("<md5>  <name>" lines) into CHK_NAMES/CHK_HASHES; it must list $2...
read_checklist() {
    local file=$1 line hash name n=0 want re='^([0-9A-Fa-f]{32})[[:space:]]+\*?(.+)$'; shift
    CHK_NAMES=() CHK_HASHES=() CHK_ERROR=""
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1)); line=$(trim "$line"); [ -n "$line" ] || continue
        [[ $line =~ $re ]] || { CHK_ERROR="line $n is not '<md5>  <file name>': '${line:0:60}'"; return 1; }
        hash=$(lower "${BASH_REMATCH[1]}") name=${BASH_REMATCH[2]#./}
        if [[ $name == .* || $name == */* || $name == *[!A-Za-z0-9._-]* ]]; then
            CHK_ERROR="line $n names an unexpected file '${name:0:60}'"; return 1
        fi
        CHK_NAMES+=("$name") CHK_HASHES+=("$hash")
    done < "$file"
    [ ${#CHK_NAMES[@]} -gt 0 ] || { CHK_ERROR="it lists no files"; return 1; }
    for want in "$@"; do   # the names are plain words (checked above)
        [[ " ${CHK_NAMES[*]} " == *" $want "* ]] || { CHK_ERROR="it does not list $want"; return 1; }
    done
}

get_checklist() {  # download checklist $1 unless a valid one is there, and load it; it must list $2...
    local rel=$1 dest="$TARGET/$1"; shift
    if [ -f "$dest" ]; then
        if read_checklist "$dest" "$@"; then SKIPPED+=("$rel"); return 0; fi
        warn "the existing $rel is not a valid checksum list ($CHK_ERROR), probably an error page saved by an earlier attempt; downloading it again."
        rm -f "$dest"
    fi
    fetch_text "$rel" || return 1
    if ! read_checklist "$dest.part" "$@"; then
        rm -f "$dest.part"
        fail_file "$rel" "not a valid checksum list" "the downloaded $rel is not a valid md5 checksum list ($CHK_ERROR), so nothing can be verified against it. Run this again; if it persists, request a new link at $REQUEST_PAGE."
        return 1
    fi
    install_part "$rel" && FETCHED+=("$rel")
}

# True if release path $1 is in place with md5 $2 ($3 = 1: say so).  Otherwise the file there
# (e.g. the original script's partial download) becomes the .part, unless that is larger.
check_existing() {
    local rel=$1 dest="$TARGET/$1" dsize
    [ -f "$dest" ] || return 1
    [ "$3" = 1 ] && say "Checking the existing $rel"
    if md5_of "$dest" && [ "$MD5" = "$2" ]; then return 0; fi
    file_size "$dest"; dsize=$SIZE; file_size "$dest.part"
    if looks_like_html "$dest" || [ "$dsize" -le "$SIZE" ]; then rm -f "$dest"; return 1; fi
    say "The existing $rel does not match its checksum; treating it as a partial download."
    mv -f "$dest" "$dest.part"; return 1
}

# Download release path $1, check it against md5 $2 ($3 = 1: progress); one fresh try after a bad resume.
get_verified() {
    local rel=$1 want=$2 part="$TARGET/$1.part" fresh=0
    if check_existing "$rel" "$want" "$3"; then SKIPPED+=("$rel"); return 0; fi
    while :; do
        fetch_part "$rel" "$3" || return 1
        if looks_like_html "$part"; then html_error "$rel"; return 1; fi
        [ "$3" = 1 ] && say "Verifying $rel"
        md5_of "$part" || { fail_file "$rel" "could not compute checksum" "could not compute the md5 checksum of $part with $MD5_TOOL."; return 1; }
        [ "$MD5" = "$want" ] && break
        rm -f "$part"
        if [ "$RESUMED" = 1 ] && [ $fresh = 0 ]; then
            say "Checksum mismatch for $rel after resuming an earlier partial download; downloading it again from the start."
            fresh=1; continue
        fi
        fail_file "$rel" "checksum mismatch" "checksum mismatch for $rel (expected $want, got $MD5). The damaged download was deleted; nothing was saved under that name. Run the same command again to download it again; if it keeps failing, request a new link."
        return 1
    done
    install_part "$rel" && FETCHED+=("$rel")
}

# Fetch checklist $2 in directory $1 (or the top), which must list $3..., then each file it lists.
get_listed_files() {
    local prefix=${1:+$1/} chk=$2 i want progress; shift 2
    if ! get_checklist "$prefix$chk" "$@"; then
        for want in "$@"; do fail_file "$prefix$want" "not attempted: no valid $chk"; done
        return 1
    fi
    for i in "${!CHK_NAMES[@]}"; do
        [ "$FATAL" = 0 ] || return 1
        progress=0; [[ ${CHK_NAMES[$i]} == *.pth ]] && progress=$((1 - QUIET))
        get_verified "$prefix${CHK_NAMES[$i]}" "${CHK_HASHES[$i]}" "$progress"
    done
}

download_all() {  # the license files, the tokenizer, then each model; stop once FATAL
    local m
    get_unchecked LICENSE
    [ "$FATAL" = 0 ] && get_unchecked USE_POLICY.md
    [ "$FATAL" = 0 ] && get_listed_files "" tokenizer_checklist.chk tokenizer.model
    for m in "${MODELS[@]}"; do
        [ "$FATAL" = 0 ] || return
        model_info "$m"
        say "== $m ($M_DIR, ${#M_SHARDS[@]} shard(s)) =="
        mkdir -p "$TARGET/$M_DIR" || { fail_file "$M_DIR" "could not create directory" "could not create $TARGET/$M_DIR"; continue; }
        get_listed_files "$M_DIR" checklist.chk "${M_SHARDS[@]}" params.json
    done
}

announce() {  # say what will be downloaded; warn if it will not fit (less the shards already here)
    local total_gb=0 need_kb=0 free m f
    for m in "${MODELS[@]}"; do
        model_info "$m"; total_gb=$((total_gb + M_GB))
        for f in "${M_SHARDS[@]}"; do
            file_size "$TARGET/$M_DIR/$f"; need_kb=$((need_kb - SIZE / 1024))
            file_size "$TARGET/$M_DIR/$f.part"; need_kb=$((need_kb - SIZE / 1024))
        done
    done
    need_kb=$((need_kb + total_gb * 1048576))
    say "Downloading ${MODELS[*]} (about $total_gb GB) from $(url_host "$URL") with $DOWNLOADER into $TARGET"
    free=$(free_kb "$TARGET")
    if [[ -n $free && $free != *[!0-9]* ]] && [ "$need_kb" -gt "$free" ]; then
        warn "about $(human_kb "$need_kb") more disk space is needed but only $(human_kb "$free") is free in $TARGET. The download will stop with a 'disk full' message when it runs out; free some space and run the same command again to resume."
    fi
}

# Print one summary section: title $1, the count, then the items $2...
print_list() { printf '%s (%d):\n' "$1" $(($# - 1)); shift; if [ $# -gt 0 ]; then printf '  %s\n' "$@"; fi; }
summary() {  # print what was downloaded, skipped and failed, and what to do next
    local abs; abs=$(cd "$TARGET" 2>/dev/null && pwd) || abs=$TARGET
    printf '\n==== Summary (%s, in %s) ====\n' "$DOWNLOADER" "$abs"
    print_list "Downloaded and verified" ${FETCHED[@]+"${FETCHED[@]}"}
    print_list "Already verified, skipped" ${SKIPPED[@]+"${SKIPPED[@]}"}
    print_list "Downloaded, no checksum published" ${UNCHECKED[@]+"${UNCHECKED[@]}"}
    print_list "Failed" ${FAILED[@]+"${FAILED[@]}"}
    if [ "$INTERRUPTED" = 1 ]; then printf 'Interrupted. Run the same command again to resume.\n'
    elif [ ${#FAILED[@]} -eq 0 ]; then printf 'All files are downloaded and verified.\n'
    else
        [ "$FATAL" = 0 ] || printf 'Stopped early: the remaining files were not attempted.\n'
        printf 'Some files failed (see above). Fix the problem and run the same command again: verified files are kept and partial ones resume.\n'
    fi
}

# On Ctrl-C or TERM: name the file kept as .part, print the summary, exit with status $1.
# shellcheck disable=SC2317  # run from the INT/TERM traps
on_signal() {
    trap '' INT TERM; INTERRUPTED=1
    printf '\n' >&2
    err "interrupted${CURRENT:+ while downloading $CURRENT. What was received is kept in $TARGET/$CURRENT.part; run the same command again to resume}."
    summary
    exit "$1"   # the EXIT trap removes TMP_DIR
}

main() {
    parse_args "$@"
    pick_tools
    RETRIES=${OPT_RETRIES:-5}
    [[ -n $RETRIES && $RETRIES != *[!0-9]* ]] || die_usage "--retries needs a whole number, not '$RETRIES'"
    [[ ${LLAMA_DOWNLOAD_RETRY_WAIT:-5} != *[!0-9]* ]] || die_usage "LLAMA_DOWNLOAD_RETRY_WAIT must be a whole number of seconds"
    read_inputs
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX") || die_usage "cannot create a temporary directory (is TMPDIR writable?)"
    LOG_FILE="$TMP_DIR/downloader.log"
    trap 'rm -rf "$TMP_DIR"' EXIT
    trap 'on_signal 130' INT; trap 'on_signal 143' TERM
    announce
    download_all
    summary
    exit $((${#FAILED[@]} > 0))   # 1: some file failed
}

main "$@"
