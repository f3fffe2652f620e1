"""The sandbox that runs model-written code (HumanEval, RL rewards), hostile programs included.

nanochat's `execution.py` forks the evaluating process and disables dangerous functions inside it:
a guard against accidents only. Here every program gets a fresh interpreter (`PYTHON -I`, never a
fork of the JAX process), whose first code is `_sandboxed`, sent as source text so that the child
imports nothing of ours. Linux only (pidfd, prctl, namespaces). What contains the program depends
on what the machine allows:

- Root with namespaces (`unshare`; the usual case in a container or CI; `network="namespace"`,
  `user="nobody"`). New network, pid, mount and IPC namespaces: no network device but a downed
  loopback, no view of host processes. Fresh tmpfs mounts cover the world-writable directories
  (/tmp, /var/tmp, /dev/shm, /run/lock) and the homes (/root, /home), so other programs' and the
  host's files there are out of sight; the interpreter's own prefix, if it lives in a home, is
  bind-mounted back. The program's directory is a folder of that private /tmp, gone with the namespace. The
  program runs as `nobody` (no supplementary groups, no_new_privs), so everywhere else it may do
  only what `nobody` may, and RLIMIT_NPROC binds. The namespace's pid 1 is a root supervisor that
  waits for it (a pid 1 would ignore its own signals); when the program ends, whatever it left
  running dies with the namespace.
- Root without namespaces (`network="guard"`, `user="nobody"`): started as `nobody`
  (`Popen(user=...)`, so `nobody` must be able to execute PYTHON) in a temporary directory, with
  an in-process network guard (`socket` refuses; `import _socket` or ctypes undo it). Shared
  directories stay writable, and a process that leaves the group with setsid outlives the run.
- Not root, e.g. a developer's machine (`user="caller"`): the program has the caller's rights:
  what the caller may read or delete, it may. Network, pid and mount namespaces come from an
  unprivileged user namespace where the kernel allows one, else the guard.

Always: CPU-time (= the timeout, a backstop for what the wall clock cannot reach), address-space,
file-size and core limits; a wall-clock timeout that kills the process group (and the namespace);
stdin at /dev/null; a minimal environment (no host variables; HOME is the program's directory);
stdout and stderr read with a cap (passing it kills the program); the temporary directory removed
even if the program took its permissions away. Not limited: CPU share, so one program's spinning
processes slow its neighbours in `execute_many`.

`passed` means the program's last statement ran and the sandbox's code after it said so on an
inherited pipe: `sys.exit(0)`, `os._exit(0)`, exit codes, output, re-executing the file under
`-O`, patched builtins, excepthooks or atexit handlers do not write that report. The honest limit:
the program shares its process with the report code, so a program that looks for the pipe
(`/proc/self/fd`) and writes the report itself before exiting forges a pass (a test pins this as
a known failure). Nothing in one process can tell "the sandbox's line after the program" from "a
program doing what that line does"; that needs a boundary of process or privilege, and the
program's end has none.
"""
import dataclasses
import functools
import inspect
import json
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

NAMESPACES = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc"]
PRIVATE_DIRS = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/root", "/home"]
PRIVATE_WORKDIR = "/tmp/program"  # the program's folder inside its private /tmp
PYTHON = sys.executable  # the interpreter programs run in (root without namespaces: nobody runs it)
DRAIN_S = 0.5  # how long pipes are still read after the program's process exited
DONE = b"done"  # what the sandbox's code writes on the report pipe after the program's last line


@dataclasses.dataclass
class ExecutionResult:
    passed: bool
    stdout: str
    stderr: str
    error: str | None     # short reason when not passed
    timeout: bool         # wall-clock or CPU time limit
    memory_exceeded: bool
    network: str          # "namespace" (only a downed loopback) or "guard" (in-process, undoable)
    user: str             # "nobody" (privileges dropped) or "caller" (not root: the caller's rights)


@dataclasses.dataclass(frozen=True)
class _Mode:
    """How programs are isolated on this machine, decided once per process."""
    prefix: tuple[str, ...]   # the unshare command line, or empty
    root: bool                # we are root: the program runs as nobody
    namespaces: bool

    @property
    def private_tmp(self) -> bool:
        """Root in namespaces: the program's directory is its private /tmp, not one of ours."""
        return self.root and self.namespaces


@functools.cache
def _mode() -> _Mode:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    prefix = (unshare, *([] if root else ["--user", "--map-current-user"]), *NAMESPACES, "--")
    try:
        works = unshare is not None and subprocess.run(
            [*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        works = False
    return _Mode(prefix if works else (), root, works)


def execute_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, disk_mb: int = 64,
                 max_processes: int = 32, max_output_bytes: int = 1 << 20) -> ExecutionResult:
    """Run `program` in the sandbox (module doc) and judge it.

    timeout_s: wall clock, also the CPU-time limit (rounded up); memory_mb: address space;
    disk_mb: largest file and, with namespaces as root, the size of each private directory;
    max_processes: processes and threads of `nobody`, all concurrent programs together (root only:
    for another caller it would count the caller's own processes); max_output_bytes: per stream.
    """
    mode = _mode()
    nobody = pwd.getpwnam("nobody")
    workdir = PRIVATE_WORKDIR if mode.private_tmp else tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        config = {
            "private_dirs": PRIVATE_DIRS if mode.private_tmp else [], "workdir": workdir, "supervise": mode.namespaces,
            "uid": nobody.pw_uid if mode.private_tmp else None, "gid": nobody.pw_gid,
            "guard": not mode.namespaces, "done": DONE.decode(), "memory_mb": memory_mb, "disk_mb": disk_mb,
            "cpu_s": math.ceil(timeout_s), "max_processes": max_processes if mode.root else None,
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        popen = {"cwd": "/" if mode.private_tmp else workdir, "env": env}
        if mode.root and not mode.private_tmp:  # no namespaces to set up first: start as nobody
            os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
            popen.update(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        run = _run([*mode.prefix, PYTHON, "-I", "-c", _CHILD_SOURCE], config, popen, program.encode(),
                   timeout_s, max_output_bytes)
    finally:
        if not mode.private_tmp:
            _remove_tree(workdir)
    return _judge(run, mode, timeout_s, max_output_bytes)


def execute_many(programs: list[str], *, max_workers: int | None = None, **limits) -> list[ExecutionResult]:
    """Run programs in parallel (threads, each waiting on its own sandbox), results in input order."""
    with ThreadPoolExecutor(max_workers or os.cpu_count()) as pool:
        return list(pool.map(functools.partial(execute_code, **limits), programs))


@dataclasses.dataclass
class _Run:
    stdout: bytes
    stderr: bytes
    report: bytes
    returncode: int
    timed_out: bool
    overflowed: bool


def _run(command: list[str], config: dict, popen: dict, program: bytes, timeout_s: float, cap: int) -> _Run:
    """Start the child in its own process group with the report pipe's write end, and collect."""
    report_r, report_w = os.pipe()
    try:
        try:
            proc = subprocess.Popen([*command, json.dumps({**config, "report_fd": report_w})],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=[report_w], process_group=0, **popen)
        finally:
            os.close(report_w)  # the child has its own copy
        with proc:
            return _collect(proc, program, report_r, timeout_s, cap)
    finally:
        os.close(report_r)


def _collect(proc: subprocess.Popen, program: bytes, report_fd: int, timeout_s: float, cap: int) -> _Run:
    """Feed the program, read the three pipes until they close or a limit hits, then kill the group.

    The group's leader is not reaped before the kill, so its id cannot have been reused. Exit is
    seen on a pidfd: after it, the pipes are read until every holder is gone (at once with a pid
    namespace) or for DRAIN_S more (a process that left the group with setsid, without namespaces).
    """
    deadline = time.monotonic() + timeout_s
    try:
        proc.stdin.write(program)  # the child reads all of it before anything else
        proc.stdin.close()
    except BrokenPipeError:
        pass
    pidfd = os.pidfd_open(proc.pid)
    received = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), report_fd: bytearray()}
    exited = overflowed = False
    with selectors.DefaultSelector() as selector:
        for fd in [*received, pidfd]:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not overflowed and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                if key.fd == pidfd:
                    exited = True
                    selector.unregister(pidfd)
                    deadline = min(deadline, time.monotonic() + DRAIN_S)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                received[key.fd] += chunk
                overflowed |= len(received[key.fd]) > cap
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.close(pidfd)
    stdout, stderr, report = (bytes(b[:cap]) for b in received.values())
    return _Run(stdout, stderr, report, proc.wait(), not exited and not overflowed, overflowed)


def _judge(run: _Run, mode: _Mode, timeout_s: float, cap: int) -> ExecutionResult:
    passed = run.report == DONE and run.returncode == 0 and not (run.timed_out or run.overflowed)
    stderr = run.stderr.decode("utf-8", "replace")
    # the namespace's supervisor turns the program's death by signal s into exit code 128 + s
    number = -run.returncode if run.returncode < 0 else run.returncode - 128 if mode.namespaces else 0
    killed_by = signal.Signals(number) if number in signal.valid_signals() else None
    timeout = run.timed_out or killed_by == signal.SIGXCPU
    if run.overflowed:
        error = f"output exceeded {cap} bytes"
    elif run.timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif passed:
        error = None
    elif killed_by == signal.SIGXCPU:
        error = "CPU time limit exceeded"
    elif killed_by:
        error = f"killed by {killed_by.name}"
    elif run.returncode == 0:
        error = "exited before the end of the program"
    else:
        last_lines = (line for line in reversed(stderr.splitlines()) if line.strip())
        error = next(last_lines, f"exit code {run.returncode}")
    return ExecutionResult(
        passed=passed, stdout=run.stdout.decode("utf-8", "replace"), stderr=stderr, error=error,
        timeout=timeout, memory_exceeded=bool(error and error.startswith("MemoryError")),
        network="namespace" if mode.namespaces else "guard", user="nobody" if mode.root else "caller")


def _remove_tree(path: str) -> None:
    """rmtree even where the program (same user, when not root) took its own permissions away."""
    os.chmod(path, 0o700)
    for parent, dirs, _ in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), 0o700)
    shutil.rmtree(path)


def _sandboxed(config: dict) -> None:
    """The child's first code (sent as source; it imports nothing of this package): read the program
    from stdin, isolate, drop, limit, run it, and report having reached its end."""
    import ctypes
    import os
    import resource
    import runpy
    import sys

    program = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, PR_SET_NO_NEW_PRIVS = 2, 4, 4096, 16384, 38

    def mount(source, target, fstype, flags, options):
        if libc.mount(source, target.encode(), fstype, flags, options) != 0:
            raise OSError(ctypes.get_errno(), f"mount on {target} failed")

    if config["private_dirs"]:
        hidden = [d for d in config["private_dirs"] if os.path.isdir(d)]
        prefixes = {p for p in (sys.prefix, sys.base_prefix) if any(p.startswith(d + "/") for d in hidden)}
        handles = {p: os.open(p, os.O_PATH) for p in prefixes}  # opened before they are covered
        for directory in hidden:
            options = f"size={config['disk_mb']}m,mode={'755' if directory in ('/root', '/home') else '1777'}"
            mount(b"tmpfs", directory, b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
        for path, handle in handles.items():  # the interpreter lives there: bind it back
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{handle}".encode(), path, None, MS_BIND | MS_REC, None)
        os.mkdir(config["workdir"], 0o700)  # its own folder: an interpreter bound back into /tmp is not in it
        if config["uid"] is not None:
            os.chown(config["workdir"], config["uid"], config["gid"])
        os.chdir(config["workdir"])
    if config["supervise"]:  # pid 1 of the namespace: it cannot die of a signal, so it reports one
        child = os.fork()
        if child:
            os.close(config["report_fd"])
            code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
            os._exit(code if code >= 0 else 128 - code)
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries on the host stay unprivileged
    megabyte = 1 << 20
    limits = {resource.RLIMIT_AS: config["memory_mb"] * megabyte, resource.RLIMIT_CORE: 0,
              resource.RLIMIT_CPU: config["cpu_s"], resource.RLIMIT_FSIZE: config["disk_mb"] * megabyte}
    if config["max_processes"] is not None:
        limits[resource.RLIMIT_NPROC] = config["max_processes"]
    for limit, value in limits.items():
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    if config["guard"]:
        import _socket
        import socket

        def refuse(*args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")
        socket.socket = _socket.socket = socket.create_connection = socket.socketpair = refuse
        socket.getaddrinfo = _socket.getaddrinfo = refuse

    with open("program.py", "wb") as file:
        file.write(program)
    runpy.run_path("program.py", run_name="__main__")
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(config["report_fd"], config["done"].encode())
    os._exit(0)


_CHILD_SOURCE = f"{inspect.getsource(_sandboxed)}\nimport json, sys\n_sandboxed(json.loads(sys.argv[1]))\n"
