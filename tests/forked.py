"""Programs run as `python ARGS...` runs them, each in a fresh fork of one process that has imported torch once.

Most of what a test of a program's flags waits for is `import torch` (1.5-2 s of CPU per program started). Here a
server process imports torch, then forks a child per run: the child takes the run's argv, sys.path[0], working
folder and environment as the interpreter would set them, gets fresh stdin/stdout/stderr files, runs the script,
module or code as `__main__` (so the project's own modules are imported in the child, with anything they print),
and exits with the status Python would give (SystemExit's code; 1 and the traceback for an uncaught exception).
For shell commands (README's bash blocks), install_python writes a `python` that hands its argv, folder,
environment and its own standard streams (the descriptors, over a Unix socket) to such a server, which forks a
child per run, several at once for a pipeline, and answers the exit status. torchrun's launcher runs this way too;
its workers are new interpreters. Tests of what only a real interpreter start shows (signals, a closed pipe at
start-up, runpy's own warnings) start real processes instead."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

NAME = "<tests/forked.py server>"
SERVER = r'''
import json, os, sys
import torch  # noqa: F401  (the import every run would otherwise pay for)

def child(req, fds=None, conn=None):
    import atexit, runpy, traceback
    os.chdir(req["cwd"])
    if fds is None:  # files named by the request
        fds = [os.open(req[name], flags) for name, flags in (("stdin", os.O_RDONLY), ("stdout", os.O_WRONLY),
                                                             ("stderr", os.O_WRONLY))]
    for fd, opened in enumerate(fds):  # or the caller's own streams, passed over the socket
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(req["env"])
    sys.stdin = open(0, "r", closefd=False)
    line = os.environ.get("PYTHONUNBUFFERED") or os.isatty(1)
    sys.stdout = open(1, "w", closefd=False, buffering=1 if line else -1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    argv = req["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.path[0] = os.getcwd()
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.path[0] = ""
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException as error:  # the traceback Python prints: from the program's own frames on
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (NAME, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb)
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        if conn is not None:
            conn.sendall(str(code).encode())
    finally:
        os._exit(code)

def serve_socket(path):
    """Runs for tests/forked.py's `python` command: one connection per run, with its three streams' descriptors;
    a child per run, several at once (a pipeline), each answering its status on its connection."""
    import select, socket
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".new")
    listener.listen(16)
    os.rename(path + ".new", path)  # found only once it listens
    while True:
        ready = select.select([sys.stdin, listener], [], [])[0]
        if sys.stdin in ready:  # end of input: the test process has ended
            return
        conn, _ = listener.accept()
        body, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        size = int.from_bytes(body[:8], "big")
        body = body[8:]
        while len(body) < size:
            body += conn.recv(size - len(body))
        if os.fork() == 0:
            listener.close()
            child(json.loads(body), fds, conn)
        conn.close()
        for fd in fds:
            os.close(fd)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # the runs that have ended
                pass
        except ChildProcessError:
            pass

if len(sys.argv) > 1:
    serve_socket(sys.argv[1])
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class _Server:
    """One forking server per test process (started at first use); runs are one at a time."""

    def __init__(self, env: Dict[str, str]) -> None:
        code = f"NAME = {NAME!r}\nexec(compile({SERVER!r}, NAME, 'exec'))"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=tempfile.gettempdir())
        self.env = env

    def run(self, argv, cwd: Path, stdin: Optional[str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as folder:
            files = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            files["stdin"].write_text(stdin or "")
            files["stdout"].touch()
            files["stderr"].touch()
            request = {"argv": list(argv), "cwd": str(cwd), "env": self.env, **{k: str(v) for k, v in files.items()}}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                self.proc.kill()
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
            reply = json.loads(self.proc.stdout.readline())
            return subprocess.CompletedProcess([sys.executable, *argv], reply["returncode"],
                                               files["stdout"].read_text(), files["stderr"].read_text())


_SERVERS: Dict[str, _Server] = {}
_LOCK = threading.Lock()


def run_python(*argv: str, cwd: Path, env: Dict[str, str], stdin: Optional[str] = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """What `subprocess.run([sys.executable, *argv], cwd=cwd, env=env, input=stdin, capture_output=True,
    text=True)` gives (stdin empty when None), without a new interpreter importing torch again."""
    key = json.dumps(env, sort_keys=True)
    with _LOCK:
        server = _SERVERS.get(key)
        if server is None or server.proc.poll() is not None:
            server = _SERVERS[key] = _Server(env)
        return server.run(argv, cwd, stdin, timeout)


CLIENT = '''#!{python} -IS
"""`python ARGS` as tests/forked.py runs it: a fork of its server (which has imported torch), given this process's
argv, working folder, environment and standard streams; this process exits with the run's status. Interpreter
options other than -m and -c, or none at all, start the real interpreter."""
import json, os, socket, sys
argv = sys.argv[1:]
if not argv or argv[0].startswith("-") and argv[0] not in ("-m", "-c"):
    os.execv({python!r}, [{python!r}, *argv])
conn = socket.socket(socket.AF_UNIX)
conn.connect({path!r})
body = json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [len(body).to_bytes(8, "big") + body], [0, 1, 2])
status = b""
while chunk := conn.recv(16):
    status += chunk
sys.exit(int(status) if status else 1)  # no status: the run was killed
'''
_SOCKETS: Dict[str, Tuple["subprocess.Popen[str]", str]] = {}


def install_python(folder: Path, env: Dict[str, str]) -> Path:
    """Write `folder/python`, a `python` for shell commands (bash -c with `folder` on PATH) whose runs are forks of
    a server that has imported torch, started once per test process and `env` (the server's own environment,
    which sets what torch reads at import; each run gets the environment of the command that starts it)."""
    key = json.dumps(env, sort_keys=True)
    with _LOCK:
        if key not in _SOCKETS or _SOCKETS[key][0].poll() is not None:
            path = os.path.join(tempfile.mkdtemp(prefix="forked-"), "socket")
            code = f"NAME = {NAME!r}\nexec(compile({SERVER!r}, NAME, 'exec'))"
            _SOCKETS[key] = (subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, text=True,
                                              env=env, cwd=tempfile.gettempdir()), path)
        server, path = _SOCKETS[key]
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists(path), "tests/forked.py's server did not start"
    command = Path(folder) / "python"
    command.write_text(CLIENT.format(python=sys.executable, path=path))
    command.chmod(0o755)
    return command
