"""The code sandbox: correct programs pass with their output, and a list of hostile programs (fork
bomb, rm -rf, writes and reads outside, the host's environment and home, a socket to the host,
10 GB, infinite loop and output, killing the parent, a segfault, faked passes, a patched checker)
all fail while the host, its canary files and its test server are untouched.

The hostile list runs in both isolations root can get: namespaces (the default here and in CI) and
nobody without namespaces (the network guard, forced by patching the mode). A further test runs
the sandbox as nobody, i.e. not root. Expectations come from what the OS must show (the canary's
bytes, the server's accept queue, the bystander process, the process table), not from the
sandbox's code.
"""
import functools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from nanochat_jax import execution
from nanochat_jax.execution import execute_code, execute_many

ROOT = os.geteuid() == 0
TIMEOUT_S = 1.5
OUTPUT_CAP = 1 << 16


@functools.cache
def nobody_python() -> str | None:
    """A Python 3.11+ that `nobody` can run (this venv's may live under root's home), or None."""
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        try:
            if python and subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                         user="nobody", cwd="/", capture_output=True).returncode == 0:
                return python
        except PermissionError:
            pass
    return None


def nobody_processes() -> set[int]:
    nobody = pwd.getpwnam("nobody").pw_uid
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == nobody}


def _uid_of(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except FileNotFoundError:
        return None


def test_correct_program_passes_with_its_stdout():
    result = execute_code("import math, json, collections\nprint(json.dumps([math.factorial(5), 'é']))")
    assert result.passed and result.error is None
    assert result.stdout == '[120, "\\u00e9"]\n'
    assert not result.timeout and not result.memory_exceeded


def test_program_runs_unprivileged_in_an_empty_directory_with_a_clean_environment():
    result = execute_code("import json, os\nprint(json.dumps([os.getuid(), os.getgid(), os.getgroups(), "
                          "sorted(os.listdir('.')), os.environ.get('HOME') == os.getcwd(), sorted(os.environ)]))")
    uid, gid, groups, listing, home_is_cwd, names = json.loads(result.stdout)
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        assert (uid, gid, groups) == (nobody.pw_uid, nobody.pw_gid, [])
    assert listing == ["program.py"] and home_is_cwd
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}


@pytest.mark.skipif(not ROOT or not execution._mode().namespaces, reason="needs root and unshare")
def test_homes_and_shared_directories_are_empty_private_mounts():
    """Only the program's folder and the interpreter's own prefix show through a hidden directory
    (this venv's Python may live in a home, or under /tmp where CI may clone the repo)."""
    shared = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/root", "/home"]
    result = execute_code(f"import json, os\nprint(json.dumps({{d: sorted(os.listdir(d)) for d in {shared} "
                          "if os.path.isdir(d)}))")
    listings = json.loads(result.stdout)
    interpreter = lambda dirs: {Path(p).relative_to(d).parts[0] for p in (sys.prefix, sys.base_prefix)
                                for d in dirs if p.startswith(d + "/")}
    assert set(listings.pop("/tmp")) == {Path(execution.PRIVATE_WORKDIR).name} | interpreter(["/tmp"])
    assert set(listings.pop("/root", [])) | set(listings.pop("/home", [])) == interpreter(["/root", "/home"])
    assert all(listing == [] for listing in listings.values()), listings


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC binds only once the program runs as nobody")
def test_processes_are_capped_and_none_outlive_the_program():
    program = ("import os, time\nchildren = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n"
               "            time.sleep(60)\n            os._exit(0)\n    except BlockingIOError:\n        break\n"
               "    children += 1\nprint(children)")
    before = nobody_processes()
    result = execute_code(program, max_processes=8)
    assert result.passed and int(result.stdout) < 8
    assert nobody_processes() <= before


def test_failing_assert_fails_with_the_error():
    result = execute_code("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add(2, 3) is wrong'")
    assert not result.passed
    assert result.error == "AssertionError: add(2, 3) is wrong"
    assert 'File "program.py", line 4' in result.stderr


def test_execute_many_keeps_the_order_of_its_programs():
    # later programs finish first; the ones at odd positions fail
    programs = [f"import time\ntime.sleep({0.05 * (6 - i)})\nprint({i})\nassert {i} % 2 == 0"
                for i in range(6)]
    results = execute_many(programs, max_workers=3, timeout_s=5)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert [r.passed for r in results] == [True, False, True, False, True, False]


CALLER_SCRIPT = """
import dataclasses, glob, json, sys
sys.path.insert(0, sys.argv[1])
import execution
programs = json.loads(sys.argv[2])
before = set(glob.glob("/tmp/nanochat-sandbox-*"))
results = {name: dataclasses.asdict(execution.execute_code(source)) for name, source in programs.items()}
leftover = sorted(set(glob.glob("/tmp/nanochat-sandbox-*")) - before)
print(json.dumps({"results": results, "leftover": leftover}))
"""


@pytest.mark.skipif(not ROOT or nobody_python() is None,
                    reason="needs root (to become nobody) and an interpreter nobody can run")
def test_not_root_runs_with_the_callers_rights_and_still_judges_right():
    """Run by nobody instead of root: the sandbox cannot drop privileges and says so; results still hold,
    with network namespaces wherever the kernel lets an unprivileged user have them."""
    module_dir = tempfile.mkdtemp(prefix="sandbox-module-")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        shutil.copy(execution.__file__, module_dir)
        os.chmod(module_dir, 0o755)
        programs = {
            "correct": "print(sum(range(10)))",
            "fake_exit": "import sys\nsys.exit(0)\nassert False",
            "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}))",
            "chmod_its_directory": "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\n"
                                   "os.chmod('a/b', 0)\nos.chmod('a', 0)\nos.chmod('.', 0)",
        }
        as_nobody = {"user": "nobody", "extra_groups": [], "cwd": "/", "env": {"PATH": "/usr/bin:/bin"}}
        userns = subprocess.run(["unshare", "--user", "--map-current-user", "--net", "true"],
                                capture_output=True, **as_nobody).returncode == 0
        run = subprocess.run([nobody_python(), "-I", "-c", CALLER_SCRIPT, module_dir, json.dumps(programs)],
                             capture_output=True, text=True, timeout=120, **as_nobody)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout.splitlines()[-1])
        results = report["results"]
        assert {r["user"] for r in results.values()} == {"caller"}
        assert {r["network"] for r in results.values()} == {"namespace" if userns else "guard"}
        assert results["correct"]["passed"] and results["correct"]["stdout"] == "45\n"
        assert not results["fake_exit"]["passed"]
        assert not results["socket"]["passed"]
        assert results["chmod_its_directory"]["passed"]
        assert report["leftover"] == []
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        shutil.rmtree(module_dir)


# name -> (program, the isolation it needs or None for all, what its result must show besides failing)
HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                  None, lambda r, f: r.timeout),
    # "/" itself is left out: nobody's rm -rf of the whole root file system takes ~20 s
    "rm_rf_parents": ("import os, subprocess\nhere = os.getcwd()\n"
                      "subprocess.run(['rm', '-rf', here, os.path.dirname(here), {home!r}, {shared_dir!r},\n"
                      "                '/tmp', '/var/tmp', '/dev/shm', '/run/lock', '/root', '/home'])\n"
                      "os.remove({shared_canary!r})", "namespace", None),
    "rm_rf_canary": ("import os, shutil, subprocess\nsubprocess.run(['rm', '-rf', {canary_dir!r}])\n"
                     "shutil.rmtree({canary_dir!r}, ignore_errors=True)\nos.remove({canary!r})", None, None),
    "write_outside": ("import os\nfor path in [{canary!r}, {canary_dir!r} + '/new', {home!r} + '/{token}',\n"
                      "             '/etc/{token}', '/var/tmp/{token}', '/dev/shm/{token}']:\n"
                      "    try:\n        open(path, 'w').write('pwned')\n    except OSError:\n        pass\n"
                      "os.chmod({canary!r}, 0o777)", None, None),
    "read_environment": ("import os\nprint(dict(os.environ))\n"
                         "print(open('/proc/{host_pid}/environ', 'rb').read())", None,
                         lambda r, f: f["secret"] not in r.stdout + r.stderr and "HOME" in r.stdout),
    "read_home": ("import os\nprint(os.path.expanduser('~'), os.listdir(os.path.expanduser('~')))\n"
                  "print(open({home!r} + '/secret.txt').read())", None,
                  lambda r, f: f["secret"] not in r.stdout + r.stderr and f["home"] not in r.stdout),
    "socket_to_host": ("import socket\nconnection = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                       "connection.sendall(b'escaped')", None, None),
    "allocate_10gb": ("blob = bytearray(10 * 1024 ** 3)", None, lambda r, f: r.memory_exceeded),
    "infinite_loop": ("while True:\n    pass", None, lambda r, f: r.timeout),
    "sleep_forever": ("import time\nwhile True:\n    time.sleep(1)", None, lambda r, f: r.timeout),
    "unbounded_output": ("while True:\n    print('x' * 1000)", None, lambda r, f: len(r.stdout) <= OUTPUT_CAP
                         and r.error == f"output exceeded {OUTPUT_CAP} bytes"),
    "kill_parent": ("import os, signal\nfor pid in [os.getppid(), 1, {host_pid}]:\n    try:\n"
                    "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                    "os.kill({bystander_pid}, signal.SIGKILL)", None, None),
    "kill_itself": ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nprint('survived')", None,
                    lambda r, f: r.error == "killed by SIGTERM" and r.stdout == ""),
    "segfault": ("import ctypes\nctypes.string_at(0)", None, lambda r, f: r.error == "killed by SIGSEGV"),
    "sys_exit_before_failing_assert": ("import sys\nsys.exit(0)\nassert False", None,
                                       lambda r, f: r.error == "exited before the end of the program"),
    "os_exit_before_failing_assert": ("import os\nos._exit(0)\nassert False", None,
                                      lambda r, f: r.error == "exited before the end of the program"),
    "print_done_then_fail": ("import sys\nprint('done')\nprint('done', file=sys.stderr)\nassert False", None,
                             lambda r, f: r.error == "AssertionError"),
    "patched_checker": ("import atexit, builtins, os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
                        "atexit.register(os._exit, 0)\nbuiltins.AssertionError = Warning\n"
                        "builtins.exit = builtins.quit = sys.exit = lambda *a: None\n"
                        "def check(candidate):\n    assert candidate(1) == 2\ncheck = lambda candidate: None\n"
                        "check(abs)\nassert False, 'the tests fail'", None, None),
    "reexec_without_asserts": ("import os, sys\nopen('tests.py', 'w').write('assert False')\n"
                               "os.execv(sys.executable, [sys.executable, '-O', 'tests.py'])", None,
                               lambda r, f: r.error == "exited before the end of the program"),
}


@pytest.mark.xfail(strict=True, reason="the known limit (nanochat_jax/execution.py): the report pipe is "
                                       "reachable from the program's own process")
def test_a_program_that_writes_the_report_itself_forges_a_pass():
    forger = ("import os\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n        os.write(int(fd), b'done')\n"
              "    except OSError:\n        pass\nos._exit(0)\nassert False")
    assert not execute_code(forger).passed


def _isolations():
    yield pytest.param("namespace", marks=pytest.mark.skipif(
        not ROOT or not execution._mode().namespaces, reason="needs root and unshare"))
    yield pytest.param("guard", marks=pytest.mark.skipif(
        not ROOT or nobody_python() is None, reason="needs root and an interpreter nobody can run"))


@pytest.fixture(scope="module", params=list(_isolations()))
def host(request):
    """Canaries, a secret, a home, a server, a bystander process, and the hostile list's results."""
    isolation = request.param
    made = [tempfile.mkdtemp(prefix="sandbox-test-") for _ in range(3)]
    canary_dir, shared_dir, home = made
    os.chmod(canary_dir, 0o755)     # root's: readable, not writable by others
    os.chmod(shared_dir, 0o777)     # anyone's: only a private /tmp protects it
    os.chmod(home, 0o755 if isolation == "namespace" else 0o700)  # hidden / private to its owner, as /root
    server = socket.create_server(("127.0.0.1", 0))
    bystander = subprocess.Popen(["sleep", "120"])
    facts = {"canary_dir": canary_dir, "canary": f"{canary_dir}/canary.txt", "shared_dir": shared_dir,
             "shared_canary": f"{shared_dir}/canary.txt", "home": home, "secret": uuid.uuid4().hex,
             "token": uuid.uuid4().hex, "host_pid": os.getpid(), "bystander_pid": bystander.pid,
             "port": server.getsockname()[1]}
    for path in (facts["canary"], facts["shared_canary"], f"{home}/secret.txt"):
        Path(path).write_text(facts["secret"])
        os.chmod(path, 0o666 if path == facts["shared_canary"] else 0o644)
    names = [name for name, (_, needs, _) in HOSTILE.items() if needs in (None, isolation)]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", home)
            patch.setenv("NANOCHAT_SANDBOX_SECRET", facts["secret"])
            if isolation == "guard":
                patch.setattr(execution, "_mode", lambda: execution._Mode((), True, False))
                patch.setattr(execution, "PYTHON", nobody_python())
            before = nobody_processes()
            # the fork bomb alone: its spinning processes would starve programs beside it of CPU
            results = [execute_code(HOSTILE["fork_bomb"][0], timeout_s=TIMEOUT_S)]
            assert names[0] == "fork_bomb"
            results += execute_many([HOSTILE[name][0].format(**facts) for name in names[1:]],
                                    max_workers=3, timeout_s=TIMEOUT_S, max_output_bytes=OUTPUT_CAP)
            leftover = nobody_processes() - before
        yield isolation, facts, dict(zip(names, results)), server, bystander, leftover
    finally:
        bystander.kill()
        bystander.wait()
        server.close()
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        for place in ("/var/tmp", "/dev/shm"):  # the guard isolation leaves them writable by nobody
            Path(place, facts["token"]).unlink(missing_ok=True)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_fails(host, name):
    isolation, facts, results, *_ = host
    if name not in results:
        pytest.skip(f"the {isolation} isolation does not contain it (see nanochat_jax/execution.py)")
    result, expected = results[name], HOSTILE[name][2]
    assert not result.passed and result.error, result
    assert result.network == isolation and result.user == "nobody"
    assert expected is None or expected(result, facts), result


def test_host_and_canaries_are_intact_after_the_hostile_list(host):
    isolation, facts, _, server, bystander, leftover = host
    assert Path(facts["canary"]).read_text() == facts["secret"]
    assert os.stat(facts["canary"]).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(facts["canary_dir"])) == ["canary.txt"]
    assert sorted(os.listdir(facts["home"])) == ["secret.txt"]
    assert Path(facts["home"], "secret.txt").read_text() == facts["secret"]
    assert not Path("/etc", facts["token"]).exists()
    if isolation == "namespace":  # shared (world-writable) places are private to each program
        assert Path(facts["shared_canary"]).read_text() == facts["secret"]
        assert not any(Path(place, facts["token"]).exists() for place in ("/var/tmp", "/dev/shm"))
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing ever connected
        server.accept()
    assert bystander.poll() is None, "a host process was killed"
    assert not leftover, "processes of nobody outlived their programs"
