"""Tests for download.sh, run against a fake signed-URL server on 127.0.0.1.

The server (tests/download_support/fake_cdn.py) serves a small fake Llama 2
release and misbehaves on request: 403 for a wrong signature, an HTML page,
a corrupted shard, a connection cut mid-file, Range headers ignored, a slow
file.  Each scenario runs with wget and with curl where the two differ.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "download.sh"
BASH = shutil.which("bash")

_spec = importlib.util.spec_from_file_location(
    "fake_cdn", Path(__file__).parent / "download_support" / "fake_cdn.py"
)
fake_cdn = importlib.util.module_from_spec(_spec)
sys.modules["fake_cdn"] = fake_cdn  # dataclasses look the module up by name
_spec.loader.exec_module(fake_cdn)

BIG = fake_cdn.BIG_FILE  # llama-2-7b/consolidated.00.pth, 2 MiB
TOP_FILES = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
DIRS = {
    "7B": "llama-2-7b",
    "13B": "llama-2-13b",
    "70B": "llama-2-70b",
    "7B-chat": "llama-2-7b-chat",
    "13B-chat": "llama-2-13b-chat",
    "70B-chat": "llama-2-70b-chat",
}

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def _tool_param(name):
    return pytest.param(
        name,
        marks=pytest.mark.skipif(
            shutil.which(name) is None, reason=f"{name} is not installed"
        ),
    )


DOWNLOADERS = [_tool_param("wget"), _tool_param("curl")]
ANY_DOWNLOADER = shutil.which("wget") and "wget" or shutil.which("curl") and "curl"
needs_downloader = pytest.mark.skipif(
    not ANY_DOWNLOADER, reason="neither wget nor curl is installed"
)


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server():
    cdn = fake_cdn.FakeCDN().start()
    yield cdn
    cdn.stop()


@pytest.fixture
def cdn(server):
    server.reset()
    yield server
    server.reset()


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.out = proc.stdout + proc.stderr

    def __repr__(self):  # shown by pytest when an assertion fails
        return f"<rc={self.rc}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}>"


def script_env(extra=None, path=None):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "DOWNLOADER")
    }
    env["LLAMA_DOWNLOAD_RETRY_WAIT"] = "0"
    if path is not None:
        env["PATH"] = str(path)
    env.update(extra or {})
    return env


def run(*args, dl=None, env=None, stdin="", cwd=None, path=None, timeout=60):
    cmd = [BASH, str(SCRIPT)]
    if dl:
        cmd += ["--downloader", dl]
    cmd += list(args)
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        text=True,
        errors="replace",
        env=script_env(env, path),
        cwd=cwd,
        timeout=timeout,
    )
    return Result(proc)


def expected_files(models):
    paths = list(TOP_FILES)
    for m in models:
        d = DIRS[m]
        paths += [p for p in fake_cdn.make_release() if p.startswith(d + "/")]
    return paths


def assert_release(cdn, target: Path, models):
    """Exactly the release files for `models`, byte-identical, nothing partial."""
    want = set(expected_files(models))
    got = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert got == want
    for rel in want:
        assert (target / rel).read_bytes() == cdn.files[rel], rel


def no_parts(target: Path):
    return not [p for p in target.rglob("*.part")]


# The external commands download.sh may run.  A PATH holding links to only
# these (minus some) hides tools from it, e.g. md5sum to act like macOS.
SCRIPT_TOOLS = [
    "bash", "cat", "curl", "df", "grep", "head", "md5", "md5sum", "mkdir",
    "mktemp", "mv", "openssl", "rm", "sleep", "tr", "wc", "wget",
]


def restricted_path(tmp_path: Path, hide=(), extra=None) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in SCRIPT_TOOLS:
        src = shutil.which(name)
        if src and name not in hide:
            (bindir / name).symlink_to(src)
    for name, text in (extra or {}).items():
        f = bindir / name
        f.write_text(text)
        f.chmod(0o755)
    return bindir


# ----------------------------------------------------------------- basics


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_help_explains_flags_and_environment():
    r = run("--help")
    assert r.rc == 0
    for word in [
        "--url", "--models", "--target-dir", "--downloader", "--quiet",
        "PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "7B-chat", "70B",
        "Enter", "resume", "md5",
    ]:
        assert word in r.stdout, word


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_non_interactive_download(cdn, tmp_path, dl):
    # Target with spaces and glob/shell characters: must be used literally.
    target = tmp_path / "my models & [x] *"
    r = run("--url", cdn.url(), "--models", "7B,13b-chat", "--target-dir", str(target), dl=dl)
    assert r.rc == 0, r
    assert_release(cdn, target, ["7B", "13B-chat"])
    assert "Downloaded and verified (9)" in r.stdout
    assert "Downloaded, no checksum published (2)" in r.stdout
    assert "Failed (0)" in r.stdout
    # A progress display for the big shard (wget bar / curl bar).
    assert ("100%[" if dl == "wget" else "100.0%") in r.stderr, r
    # Each file was fetched exactly once.
    paths = [q.path for q in cdn.requests]
    assert sorted(paths) == sorted(expected_files(["7B", "13B-chat"]))
    # The signature never shows up in the output.
    assert fake_cdn.SIGNATURE not in r.out


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_environment_variables(cdn, tmp_path, dl):
    target = tmp_path / "t"
    r = run(
        env={
            "PRESIGNED_URL": cdn.url(),
            "MODEL_SIZE": "7B-chat",
            "TARGET_FOLDER": str(target),
            "DOWNLOADER": dl,
        }
    )
    assert r.rc == 0, r
    assert f"with {dl}" in r.stderr
    assert_release(cdn, target, ["7B-chat"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_interactive_answers_on_stdin(cdn, tmp_path, dl):
    r = run(dl=dl, stdin=f"{cdn.url()}\n7B\n", cwd=tmp_path)
    assert r.rc == 0, r
    assert "Enter the URL from email" in r.stderr
    assert "press Enter for all" in r.stderr
    assert_release(cdn, tmp_path, ["7B"])


@needs_downloader
def test_interactive_enter_means_all_models(cdn, tmp_path):
    r = run("--quiet", stdin=f"  {cdn.url()}  \r\n\n", cwd=tmp_path)
    assert r.rc == 0, r
    assert_release(cdn, tmp_path, list(DIRS))


@needs_downloader
def test_missing_url_or_models_without_input(cdn, tmp_path):
    r = run(cwd=tmp_path)  # stdin at end of file: nothing to answer with
    assert r.rc == 2 and "--url" in r.stderr, r
    r = run("--url", cdn.url(), cwd=tmp_path)
    assert r.rc == 2 and "--models" in r.stderr, r
    r = run("--url", cdn.url(), "--non-interactive", stdin="7B\n", cwd=tmp_path)
    assert r.rc == 2 and "--models" in r.stderr, r
    assert cdn.requests == []
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- re-runs


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_rerun_skips_verified_files(cdn, tmp_path, dl):
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    cdn.requests.clear()
    # Even with a link that has since expired: nothing needs the server.
    r = run("--url", cdn.url(signature="expired"), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert cdn.requests == []
    assert "Already verified, skipped (7)" in r.stdout
    assert "Downloaded and verified (0)" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps
    # Adding a model fetches only that model's files.
    r = run("--url", cdn.url(), "--models", "7B,13B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert sorted(q.path for q in cdn.requests) == sorted(
        p for p in expected_files(["13B"]) if p.startswith("llama-2-13b/")
    )
    assert_release(cdn, tmp_path, ["7B", "13B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_partial_file_under_final_name_is_resumed(cdn, tmp_path, dl):
    # What the original script (wget --continue into the final name) leaves.
    shard = tmp_path / BIG
    shard.parent.mkdir(parents=True)
    shard.write_bytes(cdn.files[BIG][:5000])
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert [q.range for q in cdn.fetched(BIG)] == ["bytes=5000-"]
    assert_release(cdn, tmp_path, ["7B"])


@needs_downloader
def test_old_html_checklist_is_replaced(cdn, tmp_path):
    # The original script saved error pages as checklist.chk.
    chk = tmp_path / "llama-2-7b" / "checklist.chk"
    chk.parent.mkdir()
    chk.write_bytes(fake_cdn.HTML_PAGE)
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path))
    assert r.rc == 0, r
    assert "not a valid checksum list" in r.stderr
    assert_release(cdn, tmp_path, ["7B"])


# ----------------------------------------------------------------- bad input


@needs_downloader
def test_unknown_model_is_rejected_before_downloading(cdn, tmp_path):
    target = tmp_path / "t"
    r = run("--url", cdn.url(), "--models", "7B,8B,13b-instruct", "-d", str(target))
    assert r.rc == 2, r
    assert "unknown model '8B', '13b-instruct'" in r.stderr
    assert "7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat" in r.stderr
    assert cdn.requests == []
    assert not target.exists()


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://download.llamameta.net/llama-2-7b/params.json?Policy=a&Signature=b&Key-Pair-Id=c",
         "no '*' placeholder"),
        ("https://l.facebook.com/l.php?u=https%3A%2F%2Fdownload.llamameta.net%2F%2A%3FPolicy%3Dx&h=AT0",
         "redirect host 'l.facebook.com'"),
        ("https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fdownload.llamameta.net%2F*",
         "redirect host 'eur01.safelinks.protection.outlook.com'"),
        ("https://download.llamameta.net/*?Policy=abc&Signa", "cut off"),
        ("https://download.llamameta.net/*?Policy=abc\n&Signature=x&Key-Pair-Id=y", "split across lines"),
        ("download.llamameta.net/*?Policy=a&Signature=b&Key-Pair-Id=c", "not a web link"),
        ("", "no download URL"),
    ],
)
def test_bad_urls_are_explained(cdn, tmp_path, url, message):
    r = run("--url", url, "--models", "7B", "-d", str(tmp_path / "t"))
    assert r.rc == 2, r
    assert message in r.stderr
    assert not (tmp_path / "t").exists()


@needs_downloader
def test_star_written_as_percent_2a_is_accepted(cdn, tmp_path):
    r = run("--url", cdn.url().replace("*", "%2A"), "--models", "7B", "-d", str(tmp_path))
    assert r.rc == 0, r
    assert_release(cdn, tmp_path, ["7B"])


def test_no_downloader_installed(tmp_path):
    path = restricted_path(tmp_path, hide={"wget", "curl"})
    r = run("--url", "https://x/*?a", "--models", "7B", path=path)
    assert r.rc == 2, r
    assert "neither wget nor curl" in r.stderr
    assert "wget: not found" in r.stderr and "curl: not found" in r.stderr


@pytest.mark.parametrize("dl", ["wget", "curl"])
def test_requested_downloader_missing(tmp_path, dl):
    path = restricted_path(tmp_path, hide={dl})
    r = run("--url", "https://x/*?a", "--models", "7B", dl=dl, path=path)
    assert r.rc == 2, r
    assert f"{dl} was requested but is not installed" in r.stderr


# ----------------------------------------------------------------- server errors


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_expired_link_403(cdn, tmp_path, dl):
    r = run("--url", cdn.url(signature="wrong"), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 1, r
    assert "403" in r.stderr and "expired" in r.stderr and "new link" in r.stderr
    assert "Failed (1)" in r.stdout
    assert "Stopped early" in r.stdout
    # It stops at once instead of trying every file with a dead link.
    assert len(cdn.requests) == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_unresolvable_host_fails_at_once_and_leaves_nothing(tmp_path, dl):
    """A host name that does not resolve (a mistyped link; `.invalid` never resolves) is not a network hiccup:
    one attempt, one clear message, the run stops, and no LICENSE.part (or any file) is left behind."""
    url = "https://download.llamameta.invalid/*?Policy=a&Signature=b&Key-Pair-Id=c"
    r = run("--url", url, "--models", "7B", "-d", str(tmp_path), "--retries", "5", dl=dl)
    assert r.rc == 1, r
    assert "could not resolve the host name download.llamameta.invalid" in r.stderr, r
    assert "attempt 2" not in r.out and r.out.count("Downloading LICENSE") == 1, r
    assert "Stopped early" in r.stdout
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], r


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_404_is_reported_and_other_files_continue(cdn, tmp_path, dl):
    cdn.behaviour.status["llama-2-7b/params.json"] = 404
    r = run("--url", cdn.url(), "--models", "7B,7B-chat", "-d", str(tmp_path), dl=dl)
    assert r.rc == 1, r
    assert "llama-2-7b/params.json was not found on the server (404)" in r.stderr
    assert "  llama-2-7b/params.json: 404 Not Found" in r.stdout
    assert not (tmp_path / "llama-2-7b/params.json").exists()
    assert (tmp_path / "llama-2-7b-chat/params.json").read_bytes() == cdn.files[
        "llama-2-7b-chat/params.json"
    ]
    assert no_parts(tmp_path)


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_html_page_instead_of_checklist(cdn, tmp_path, dl):
    cdn.behaviour.html.add("llama-2-7b/checklist.chk")
    r = run("--url", cdn.url(), "--models", "7B,13B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 1, r
    assert "web page" in r.stderr and "llama-2-7b/checklist.chk" in r.stderr
    assert "md5sum: no properly formatted" not in r.out
    assert not (tmp_path / "llama-2-7b/checklist.chk").exists()
    # Without a checklist nothing of that model is fetched ...
    assert cdn.fetched(BIG) == []
    assert "llama-2-7b/consolidated.00.pth: not attempted" in r.stdout
    # ... but the other model is.
    assert (tmp_path / "llama-2-13b/consolidated.01.pth").exists()
    assert no_parts(tmp_path)


@needs_downloader
def test_html_page_instead_of_license(cdn, tmp_path):
    cdn.behaviour.html.add("LICENSE")
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path))
    assert r.rc == 1, r
    assert "web page" in r.stderr
    assert not (tmp_path / "LICENSE").exists()
    assert no_parts(tmp_path)


@needs_downloader
def test_malformed_checklist(cdn, tmp_path):
    cdn.files = dict(cdn.files)
    try:
        cdn.files["llama-2-7b/checklist.chk"] = b"not a checksum\n"
        r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path))
    finally:
        cdn.files = fake_cdn.make_release()
    assert r.rc == 1, r
    assert "not a valid md5 checksum list" in r.stderr
    assert not (tmp_path / "llama-2-7b/checklist.chk").exists()


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_corrupted_shard(cdn, tmp_path, dl):
    cdn.behaviour.corrupt.add(BIG)
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 1, r
    assert f"checksum mismatch for {BIG}" in r.stderr
    assert f"  {BIG}: checksum mismatch" in r.stdout
    assert not (tmp_path / BIG).exists()
    assert no_parts(tmp_path)
    # The other files of the model are still fetched and kept.
    assert (tmp_path / "llama-2-7b/params.json").exists()
    cdn.reset()
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert [q.path for q in cdn.requests] == [BIG]
    assert_release(cdn, tmp_path, ["7B"])


# ----------------------------------------------------------------- resuming


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_connection_cut_is_resumed_in_the_same_run(cdn, tmp_path, dl):
    cdn.behaviour.cut_once[BIG] = 300_000
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert [q.range for q in cdn.fetched(BIG)] == [None, "bytes=300000-"]
    assert "Resuming llama-2-7b/consolidated.00.pth from byte 300000" in r.stderr
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_connection_cut_is_resumed_by_the_next_run(cdn, tmp_path, dl):
    cdn.behaviour.cut_once[BIG] = 300_000
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), "--retries", "0", dl=dl)
    assert r.rc == 1, r
    assert "run the same command again to resume" in r.stderr
    assert not (tmp_path / BIG).exists()
    assert (tmp_path / (BIG + ".part")).stat().st_size == 300_000
    cdn.requests.clear()
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    # The first run stopped at the network error, before params.json.
    assert [(q.path, q.range) for q in cdn.requests] == [
        (BIG, "bytes=300000-"),
        ("llama-2-7b/params.json", None),
    ]
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_server_ignoring_range_restarts_the_file(cdn, tmp_path, dl):
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(cdn.files[BIG][:1000])
    cdn.behaviour.ignore_range = True
    # Restarting is not a retry: it works with --retries 0 too.
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), "--retries", "0", dl=dl)
    assert r.rc == 0, r
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_complete_partial_file_is_verified_and_kept(cdn, tmp_path, dl):
    # E.g. interrupted while checking the finished download: 416 from the server.
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(cdn.files[BIG])
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert [(q.range, q.status) for q in cdn.fetched(BIG)] == [
        (f"bytes={fake_cdn.BIG_SIZE}-", 416)
    ]
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_bad_partial_file_is_downloaded_again(cdn, tmp_path, dl):
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # resumes fine, but the result is wrong
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert "again from the start" in r.stderr
    assert [q.range for q in cdn.fetched(BIG)] == ["bytes=1000-", None]
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_ctrl_c_keeps_the_partial_file_and_rerun_resumes(cdn, tmp_path, dl):
    cdn.behaviour.throttle[BIG] = 0.05  # 2 MiB in ~6 s
    cmd = [BASH, str(SCRIPT), "--downloader", dl, "--url", cdn.url(), "--models", "7B",
           "-d", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=script_env(), start_new_session=True,
    )
    part = tmp_path / (BIG + ".part")
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 100_000):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (out, err)
    assert f"interrupted while downloading {BIG}" in err
    assert "Interrupted. Run the same command again to resume." in out
    assert not (tmp_path / BIG).exists()
    size = part.stat().st_size
    assert 0 < size < fake_cdn.BIG_SIZE

    # The server logs a request when it ends; let the cut one finish first.
    deadline = time.monotonic() + 10
    while not cdn.fetched(BIG) and time.monotonic() < deadline:
        time.sleep(0.05)
    cdn.reset()
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 0, r
    assert [q.range for q in cdn.fetched(BIG)] == [f"bytes={size}-"]
    assert_release(cdn, tmp_path, ["7B"])


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.exists("/dev/full")),
    reason="needs /dev/full to simulate a full disk",
)
@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_disk_full(cdn, tmp_path, dl):
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.symlink_to("/dev/full")  # every write fails with ENOSPC
    r = run("--url", cdn.url(), "--models", "7B,13B", "-d", str(tmp_path), dl=dl)
    assert r.rc == 1, r
    assert "disk is probably full" in r.stderr
    assert "Free some space" in r.stderr
    assert not (tmp_path / BIG).exists()
    # It stops: the next files would not fit either.
    assert cdn.fetched("llama-2-7b/params.json") == []
    assert cdn.fetched("llama-2-13b/checklist.chk") == []


# ----------------------------------------------------------------- macOS md5

FAKE_MD5 = """#!{python}
# Stand-in for macOS's md5: only 'md5 -r FILE...' ("<hash> <file>").
import hashlib, sys
args = sys.argv[1:]
if not args or args[0] != "-r":
    sys.exit("fake md5: expected -r")
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
for name in args[1:]:
    with open(name, "rb") as f:
        print(hashlib.md5(f.read()).hexdigest(), name)
"""


@needs_downloader
def test_macos_md5_is_used_and_really_compares(cdn, tmp_path):
    log = tmp_path / "md5.log"
    path = restricted_path(
        tmp_path, hide={"md5sum"},
        extra={"md5": FAKE_MD5.format(python=sys.executable, log=str(log))},
    )
    target = tmp_path / "t"
    cdn.behaviour.corrupt.add("llama-2-7b/params.json")
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(target), path=path)
    assert r.rc == 1, r
    assert "checksum mismatch for llama-2-7b/params.json" in r.stderr
    assert not (target / "llama-2-7b/params.json").exists()
    cdn.reset()
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(target), path=path)
    assert r.rc == 0, r
    assert_release(cdn, target, ["7B"])
    checked = log.read_text()
    assert "consolidated.00.pth" in checked and "tokenizer.model" in checked


@needs_downloader
def test_openssl_md5_fallback(cdn, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    path = restricted_path(tmp_path, hide={"md5sum", "md5"})
    target = tmp_path / "t"
    cdn.behaviour.corrupt.add(BIG)
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(target), path=path)
    assert r.rc == 1 and f"checksum mismatch for {BIG}" in r.stderr, r
    cdn.reset()
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(target), path=path)
    assert r.rc == 0, r
    assert_release(cdn, target, ["7B"])


# ----------------------------------------------------------------- the fake server


def test_fake_release_checklists_match_files():
    files = fake_cdn.make_release()
    for chk in [p for p in files if p.endswith(".chk")]:
        base = chk.rpartition("/")[0]
        for line in files[chk].decode().splitlines():
            digest, name = line.split()
            rel = f"{base}/{name}" if base else name
            assert hashlib.md5(files[rel]).hexdigest() == digest


# ----------------------------------------------------------------- more options and signals


@needs_downloader
def test_option_equals_forms_and_usage_errors(cdn, tmp_path):
    target = tmp_path / "t"
    r = run(f"--url={cdn.url()}", "--model=7B", f"--target-dir={target}", "--retries=1", "-q")
    assert r.rc == 0, r
    assert_release(cdn, target, ["7B"])
    cdn.requests.clear()
    for args, message in [
        (["--url"], "--url needs a value"),
        (["--bogus"], "unknown option '--bogus'"),
        (["--help=x"], "unknown option '--help=x'"),
        (["https://x/*?a", "https://y/*?b"], "unexpected argument 'https://y/*?b'"),
        (["--url", cdn.url(), "--retries", "x"], "--retries needs a whole number"),
        (["--downloader", "aria2"], "--downloader must be 'wget' or 'curl'"),
    ]:
        r = run("--models", "7B", *args, cwd=tmp_path)
        assert r.rc == 2 and message in r.stderr, (args, r)
    assert cdn.requests == []


@pytest.mark.parametrize("dl", DOWNLOADERS)
def test_busy_server_is_retried_then_reported(cdn, tmp_path, dl):
    cdn.behaviour.status[BIG] = 503
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path), "--retries", "1", dl=dl)
    assert r.rc == 1, r
    assert f"The server answered 503 for {BIG}; trying again in 0s (attempt 2 of 2)." in r.stderr
    assert f"the server kept answering 503 for {BIG}" in r.stderr
    assert f"  {BIG}: HTTP 503" in r.stdout
    assert len(cdn.fetched(BIG)) == 2
    # Not a reason to stop: the model's other files are still fetched.
    assert "Stopped early" not in r.stdout
    assert (tmp_path / "llama-2-7b/params.json").exists()
    assert no_parts(tmp_path)


@needs_downloader
def test_term_exits_143_and_temporary_files_are_removed(cdn, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    r = run("--url", cdn.url(), "--models", "7B", "-d", str(tmp_path / "a"), env=env)
    assert r.rc == 0, r
    assert list(tmpdir.iterdir()) == []

    cdn.behaviour.throttle[BIG] = 0.05
    cmd = [BASH, str(SCRIPT), "--url", cdn.url(), "--models", "7B", "-d", str(tmp_path / "b")]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=script_env(env), start_new_session=True,
    )
    part = tmp_path / "b" / (BIG + ".part")
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 50_000):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, (out, err)
    assert f"interrupted while downloading {BIG}" in err
    assert "Interrupted. Run the same command again to resume." in out
    assert list(tmpdir.iterdir()) == []
