#!/usr/bin/env python3
"""Benchmark: watcher over loopback ssh against the plain tools, in one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_ssh.py            # full sizes (about 2 min)
    .venv/bin/python benchmarks/bench_ssh.py --quick    # small sizes, for development

Everything it writes (data, watched tree, far side, catalog) goes under one
work directory in /dev/shm unless --workdir says otherwise (see the README:
this machine's disk makes file creation randomly slow), removed at the end.

It starts its own throw-away sshd on 127.0.0.1 (tests/sshd.py's SshServer;
as root it logs in as the unprivileged `watchertest`), and measures:

A. plain tools per data set: one `rsync -a` of the tree over ssh, one local
   md5 pass (find | xargs md5sum) and one remote md5 pass (ssh ... find |
   xargs md5sum), each a new ssh connection, run one after the other; and
   the raw pipe, `cat FILES | ssh HOST 'cat > /dev/null'` (the same ssh
   options and cipher): the wire's own speed, which "send it and prove it"
   cannot beat (issue 14 asks 4 x 256 MiB in at most 1.5x of it);
B. watcher, as its own process (`watcher run --config FILE`, logging at
   INFO to a file, as in production): the clock starts when the prepared
   directory (built outside the watched tree on the same file system) is
   moved into the watched tree with os.rename, and stops when the catalog
   shows every file verified (remote_md5sum = local_md5sum);
C. `cp -r` of a tree into the watched tree while the agent runs: the total
   from the start of cp, and the time from cp's exit until all are verified;
D. one 1 MiB file written into a watched directory, against one cold
   `rsync` of it plus one cold `ssh ... md5sum` of it (median of repeats).

Each row also says how many CPU seconds the whole machine used meanwhile
(both sides of the ssh connection, every process). Nothing here is a
pass/fail test: the numbers depend on the machine and on whatever else runs
on it.  See benchmarks/README.md for recorded results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if os.environ.get("WATCHER_SRC"):  # measure another copy of the package (e.g. an older commit)
    sys.path.insert(0, os.environ["WATCHER_SRC"])

import yaml  # noqa: E402

from tests.sshd import SshServer, force_rmtree  # noqa: E402
try:
    from watcher.catalog.states import UNVERIFIED  # noqa: E402
except ImportError:  # WATCHER_SRC of a commit before the catalog package (issue 10)
    from watcher.db import UNVERIFIED  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
POLL = 0.02            # seconds between catalog polls
PERF_HZ = 499          # --by-process: perf's samples per second and CPU
FILES_PER_DIR = 1000   # data sets are trees of directories of this many files

# lsyncd (copies, verifies nothing) from the start of a `cp -r` on this machine.
LSYNCD_REFERENCE = {2000: 1.9, 20000: 15.0}


@dataclass
class DataSet:
    name: str
    count: int
    size: int
    target: float  # watcher / plain tools must stay within this
    raw_target: float | None = None  # watcher / the raw ssh pipe, where issue 14 sets a goal

    @property
    def label(self) -> str:
        size = f"{self.size // MiB} MiB" if self.size >= MiB else f"{self.size // KiB} KiB"
        return f"{self.count:,} x {size}"


FULL = [DataSet("small", 2000, 16 * KiB, 1.5),
        DataSet("many", 20000, 4 * KiB, 1.5),
        DataSet("large", 4, 256 * MiB, 1.25, 1.5),
        DataSet("burst", 24, 64 * MiB, 1.25)]
QUICK = [DataSet("small", 2000, 16 * KiB, 1.5),
         DataSet("many", 2000, 4 * KiB, 1.5),
         DataSet("large", 2, 64 * MiB, 1.25, 1.5)]
CP_FULL = [DataSet("cp-2k", 2000, 16 * KiB, 0), DataSet("cp-20k", 20000, 4 * KiB, 0)]
CP_QUICK = [DataSet("cp-2k", 2000, 16 * KiB, 0), DataSet("cp-5k", 5000, 4 * KiB, 0)]


@dataclass
class Row:
    scenario: str
    data: str
    plain: float | None
    watcher: float
    target: float | None = None
    notes: list[str] = field(default_factory=list)
    raw: float | None = None  # the raw ssh pipe of the same files (A/B)
    raw_target: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.watcher / self.plain if self.plain else None


def make_tree(root: Path, count: int, size: int) -> Path:
    """`count` files of `size` random bytes, FILES_PER_DIR to a directory."""
    root.mkdir(parents=True)
    chunk = os.urandom(64 * MiB + 4096) if size > MiB else b""
    for i in range(count):
        d = root / f"d{i // FILES_PER_DIR:03d}"
        if i % FILES_PER_DIR == 0:
            d.mkdir()
        with open(d / f"f{i:06d}.dat", "wb") as f:
            if not chunk:
                f.write(os.urandom(size))
                continue
            left, n = size, 0
            while left > 0:
                part = min(left, 64 * MiB)
                off = (i * 7919 + n * 104729) % 4096  # no two files alike
                f.write(chunk[off:off + part])
                left -= part
                n += 1
    return root


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kw)


class Bench:
    def __init__(self, args):
        self.args = args
        # Everything (data, watched tree, far side, watcher's temporary
        # symlink trees, via TMPDIR) goes under one work directory.
        self.work = Path(tempfile.mkdtemp(prefix="watcher-bench-", dir=args.workdir))
        self.work.chmod(0o755)  # the far dirs below it belong to the ssh login user
        os.environ["TMPDIR"] = str(self.work)
        tempfile.tempdir = str(self.work)
        self.server = SshServer()
        self.rows: list[Row] = []
        self.profiles: list[tuple[str, float, dict[str, float]]] = []  # --by-process
        self.log_file = self.work / "agent.log"  # every agent's log, one after the other

    # -- plain tools --------------------------------------------------------------

    def ssh(self) -> list[str]:
        cipher = ["-c", self.args.cipher] if self.args.cipher else []
        return ["ssh", *self.server.ssh_options(), *cipher]

    def raw_pipe(self, tree: Path) -> float:
        """`cat FILES | ssh HOST 'cat > /dev/null'`: the bytes over the wire, nothing else."""
        files = sorted(str(p) for p in tree.rglob("*") if p.is_file())
        t0 = time.monotonic()
        cat = subprocess.Popen(["xargs", "-0", "cat", "--"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ssh = subprocess.Popen([*self.ssh(), "--", self.server.ssh_target, "cat > /dev/null"],
                               stdin=cat.stdout)
        cat.stdout.close()
        cat.communicate(b"".join(os.fsencode(f) + b"\0" for f in files))
        if ssh.wait() != 0 or cat.returncode != 0:
            raise RuntimeError("the raw pipe failed")
        return time.monotonic() - t0

    def remote_md5_pass(self, remote: Path) -> bytes:
        script = f"cd {shlex.quote(str(remote))} && find . -type f -print0 | xargs -0 md5sum"
        return run([*self.ssh(), "--", self.server.ssh_target, script], stdout=subprocess.PIPE).stdout

    def plain_tools(self, tree: Path, remote: Path) -> tuple[float, list[str]]:
        """rsync -a of the tree, then a local and a remote md5 pass."""
        c0, t0 = cpu_seconds(), time.monotonic()
        bwlimit = [f"--bwlimit={self.args.bwlimit}"] if self.args.bwlimit else []
        run(["rsync", "-a", *bwlimit, "-e", shlex.join(self.ssh()), "--", f"{tree}/",
             f"{self.server.ssh_target}:{remote}/"])
        t1 = time.monotonic()
        local = subprocess.run(f"find {shlex.quote(str(tree))} -type f -print0 | xargs -0 md5sum",
                               shell=True, check=True, stdout=subprocess.PIPE).stdout
        t2 = time.monotonic()
        far = self.remote_md5_pass(remote)
        t3 = time.monotonic()
        cpu = cpu_seconds() - c0
        assert local.count(b"\n") == far.count(b"\n"), "plain tools: file counts differ"
        return t3 - t0, [f"rsync {t1 - t0:.2f}", f"md5 local {t2 - t1:.2f}", f"md5 far {t3 - t2:.2f}",
                         f"cpu {cpu:.2f}"]

    # -- watcher ------------------------------------------------------------------

    def start_agent(self, name: str) -> tuple[AgentRun, Path, Path, Path]:
        """A fresh catalog, inbox and far directory; the agent started and scanned."""
        base = self.work / name
        inbox = base / "inbox"
        inbox.mkdir(parents=True)
        remote = self.server.remote_root()
        archive = {"remote_basedir": str(remote), "ssh_host": self.server.ssh_target,
                   "ssh_key": str(self.server.client_key), "ssh_port": self.server.port,
                   "known_hosts": str(self.server.known_hosts)}
        if self.args.far_side == "serve":  # through `watcher serve`, a forced command (README)
            archive.update(far_side="serve", ssh_key=str(self.serve_key()))
        if self.args.batch:
            archive["files_per_batch"] = self.args.batch
        if self.args.cipher:
            archive["ssh_cipher"] = self.args.cipher
        if self.args.fsync:
            archive["fsync"] = self.args.fsync
        if self.args.bwlimit:
            archive["bwlimit"] = self.args.bwlimit
        rule = {"watch": str(inbox), "archive": "far"}
        if self.args.settle is not None:
            rule["settle"] = self.args.settle
        rules = {"instance_id": "bench", "database": str(base / "catalog.db"),
                 "file_root": str(base / "finalization"), "archives": {"far": archive},
                 "rules": [rule]}
        path = base / "rules.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        agent = AgentRun(path, self.log_file, self.args.debug_log)
        wait(lambda: agent.said("start-up scan done"), 30, "the agent's start-up scan")
        return agent, inbox, remote, base / "catalog.db"

    def serve_key(self) -> Path:
        """A key whose logins run `watcher serve --root` (every far directory's parent)."""
        key = self.work / "serve_key"
        if not key.exists():
            root = self.server.remote_root().parent
            self.server.add_forced_key(key, shlex.join([*self.server.login_python(), "-m", "watcher.serve",
                                                         "--root", str(root)]))
        return key

    def wait_verified(self, db: Path, count: int, timeout: float) -> tuple[float, float]:
        """Poll the catalog until `count` rows are verified; (registered at, verified at).

        Polls cost next to nothing, so that they do not slow the agent: the
        highest row id (the catalog is fresh and rows are never deleted, so
        it is the number of rows), then whether any row is left unverified
        (the first entry of the agent's own partial index of them). The end
        is confirmed by counting every row whose far md5 matches.
        """
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        registered = None
        deadline = time.monotonic() + timeout
        try:
            while True:
                now = time.monotonic()
                if registered is None:
                    rows = con.execute("SELECT coalesce(max(id), 0) FROM supersync_v0").fetchone()[0]
                    if rows >= count:
                        registered = now
                if registered is not None and con.execute(
                        f"SELECT 1 FROM supersync_v0 WHERE {UNVERIFIED} LIMIT 1").fetchone() is None:
                    done = con.execute("SELECT count(*) FROM supersync_v0 "
                                       "WHERE remote_md5sum = local_md5sum").fetchone()[0]
                    if done >= count:
                        return registered, now
                    raise RuntimeError(f"only {done} of {count} files verified, none left to ship "
                                       f"(see {self.log_file})")
                if now > deadline:
                    done = con.execute("SELECT count(*) FROM supersync_v0 "
                                       "WHERE remote_md5sum = local_md5sum").fetchone()[0]
                    raise TimeoutError(f"only {done} of {count} files verified after {timeout:.0f}s "
                                       f"(see {self.log_file})")
                time.sleep(POLL)
        finally:
            con.close()

    @staticmethod
    def far_files(remote: Path) -> int:
        return sum(len(files) for _, _, files in os.walk(remote))

    # -- scenarios ---------------------------------------------------------------

    def scenario_a_b(self, ds: DataSet) -> None:
        say(f"A/B {ds.label}: preparing")
        staging = self.work / f"staging-{ds.name}"
        tree = make_tree(staging / ds.name, ds.count, ds.size)
        run(["sync"])
        plain_remote = self.server.remote_root()
        say(f"A   {ds.label}: plain tools")
        with self.by_process(f"{ds.label}, plain tools (rsync -a, md5 local, md5 far)"):
            plain, parts = self.plain_tools(tree, plain_remote)
        say(f"A   {ds.label}: raw pipe")
        with self.by_process(f"{ds.label}, raw pipe"):
            raw = self.raw_pipe(tree)
        agent, inbox, remote, db = self.start_agent(f"b-{ds.name}")
        try:
            say(f"B   {ds.label}: watcher")
            with self.by_process(f"{ds.label}, watcher"):
                c0, t0 = cpu_seconds(), time.monotonic()
                os.rename(tree, inbox / ds.name)
                registered, verified = self.wait_verified(db, ds.count, timeout=max(120, 40 * plain))
                cpu = cpu_seconds() - c0
        finally:
            agent.stop()
        far = self.far_files(remote)
        assert far == ds.count, f"{far} files on the far side, expected {ds.count}"
        self.rows.append(Row("B move-in", ds.label, plain, verified - t0, ds.target,
                             parts + [f"raw pipe {raw:.2f}", f"watcher / raw {(verified - t0) / raw:.2f}x",
                                      f"watcher: all registered at {registered - t0:.2f}",
                                      f"cpu {cpu:.2f}"], raw=raw, raw_target=ds.raw_target))
        self.report(self.rows[-1])

    def scenario_c(self, ds: DataSet) -> None:
        say(f"C   {ds.label}: preparing")
        src = make_tree(self.work / f"src-{ds.name}" / ds.name, ds.count, ds.size)
        run(["sync"])
        agent, inbox, remote, db = self.start_agent(f"c-{ds.name}")
        try:
            say(f"C   {ds.label}: cp -r into the watched tree")
            t0 = time.monotonic()
            run(["cp", "-r", "--", str(src), str(inbox / ds.name)])
            landed = time.monotonic()
            registered, verified = self.wait_verified(db, ds.count, timeout=300)
        finally:
            agent.stop()
        far = self.far_files(remote)
        assert far == ds.count, f"{far} files on the far side, expected {ds.count}"
        ref = LSYNCD_REFERENCE.get(ds.count)
        notes = [f"cp took {landed - t0:.2f}", f"verified {verified - landed:.2f} after cp exited",
                 f"all registered at {registered - t0:.2f}"]
        self.rows.append(Row("C cp -r", ds.label, ref, verified - t0, 1.0 if ref else None,
                             notes + ([f"reference: lsyncd {ref} s, copy only"] if ref else [])))
        self.report(self.rows[-1])

    def scenario_d(self, repeats: int) -> None:
        say(f"D   1 MiB x {repeats}: single files")
        src_dir = self.work / "d-src"
        src_dir.mkdir()
        plain_times, watcher_times = [], []
        agent, inbox, remote, db = self.start_agent("d")
        try:
            for i in range(repeats):
                data = os.urandom(MiB)
                # plain: one cold rsync of the file, one cold ssh md5sum of it
                src = src_dir / f"single-{i}.dat"
                src.write_bytes(data)
                plain_remote = self.server.remote_root()
                t0 = time.monotonic()
                run(["rsync", "-a", "-e", self.server.rsync_rsh(), "--", str(src),
                     f"{self.server.ssh_target}:{plain_remote}/"])
                out = run([*self.ssh(), "--", self.server.ssh_target,
                           f"md5sum -- {shlex.quote(str(plain_remote / src.name))}"],
                          stdout=subprocess.PIPE).stdout
                plain_times.append(time.monotonic() - t0)
                assert out.split()[0].decode() == md5_hex(data)
                # watcher: the same bytes written into the watched directory
                t0 = time.monotonic()
                with open(inbox / f"single-{i}.dat", "wb") as f:
                    f.write(data)
                _, verified = self.wait_verified(db, i + 1, timeout=60)
                watcher_times.append(verified - t0)
        finally:
            agent.stop()
        plain, watch = statistics.median(plain_times), statistics.median(watcher_times)
        self.rows.append(Row("D one file", "1 MiB", plain, watch, 1.5, [
            "plain " + " ".join(f"{t:.3f}" for t in plain_times),
            "watcher " + " ".join(f"{t:.3f}" for t in watcher_times),
            "(medians of the repeats; the first watcher file opens the shared ssh connection)"]))
        self.report(self.rows[-1])

    @contextlib.contextmanager
    def by_process(self, what: str):
        """With --by-process: `perf record -a` meanwhile, then the CPU seconds
        of each command name (every process of both "hosts"), for the table."""
        if not self.args.by_process:
            yield
            return
        data = self.work / f"perf-{len(self.profiles)}.data"
        perf = subprocess.Popen(["perf", "record", "-a", "-F", str(PERF_HZ), "-q", "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf's own start, outside the measured time
        t0 = time.monotonic()
        try:
            yield
        finally:
            wall = time.monotonic() - t0
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        report = run(["perf", "report", "-i", str(data), "-n", "--sort", "comm", "--stdio"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        seconds: dict[str, float] = {}
        for line in report.splitlines():
            fields = line.split()
            if len(fields) >= 3 and not line.startswith("#") and fields[1].isdigit():
                name = "idle" if fields[2] == "swapper" else fields[2]
                seconds[name] = seconds.get(name, 0.0) + int(fields[1]) / PERF_HZ
        self.profiles.append((what, wall, seconds))

    # -- output -------------------------------------------------------------------

    def report(self, row: Row) -> None:
        ratio = f"{row.ratio:.2f}x" if row.ratio else "-"
        say(f"    -> watcher {row.watcher:.2f} s, plain {fmt(row.plain)} s, ratio {ratio}; "
            + "; ".join(row.notes))

    def table(self) -> str:
        head = ("scenario", "data", "plain tools s", "watcher s", "ratio", "target", "", "raw pipe s",
                "watcher/raw", "goal")
        lines = [head]
        for r in self.rows:
            if r.target and r.ratio is not None:
                verdict = "ok" if r.ratio <= r.target else "MISSED"
                target = f"<= {r.target:g}x"
            else:
                verdict, target = "", "-"
            lines.append((r.scenario, r.data, fmt(r.plain), f"{r.watcher:.2f}",
                          f"{r.ratio:.2f}x" if r.ratio is not None else "-", target, verdict, fmt(r.raw),
                          f"{r.watcher / r.raw:.2f}x" if r.raw else "-",
                          "" if not (r.raw and r.raw_target) else
                          f"<= {r.raw_target:g}x {'ok' if r.watcher / r.raw <= r.raw_target else 'MISSED'}"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.append("")
        for r in self.rows:
            out.append(f"{r.scenario} {r.data}: " + "; ".join(r.notes))
        for what, wall, seconds in self.profiles:
            busy = sum(v for k, v in seconds.items() if k != "idle")
            top = sorted(((v, k) for k, v in seconds.items() if k != "idle" and v >= 0.05), reverse=True)
            out.append(f"CPU s by process, {what}: wall {wall:.2f}, busy {busy:.2f} (at least "
                       f"{busy / os.cpu_count():.2f} s on {os.cpu_count()} cores), idle "
                       f"{seconds.get('idle', 0):.2f}: " + ", ".join(f"{k} {v:.2f}" for v, k in top))
        return "\n".join(out)

    def main(self) -> None:
        args = self.args
        sets = QUICK if args.quick else FULL
        cps = CP_QUICK if args.quick else CP_FULL
        if args.only:
            sets = [d for d in sets if d.name in args.only]
            cps = [d for d in cps if d.name in args.only]
        self.server.start()
        started = time.monotonic()
        try:
            if "B" in args.scenarios:
                for ds in sets:
                    self.scenario_a_b(ds)
            if "C" in args.scenarios:
                for ds in cps:
                    self.scenario_c(ds)
            if "D" in args.scenarios:
                self.scenario_d(args.repeats)
        finally:
            self.server.cleanup()
            # Nothing is deleted before the end: on an ext4 without a journal
            # (this machine's), inodes freed in the last 30 s make new ones slow.
            if not args.keep:
                force_rmtree(self.work)
        print()
        print(f"watcher {describe_machine()}; total {time.monotonic() - started:.0f} s")
        print(self.table())


class AgentRun:
    """``watcher run --config FILE`` as its own process, as in production, its
    log appended to the bench's agent.log; ``WATCHER_SRC`` goes on its path."""

    def __init__(self, config: Path, log_file: Path, debug: bool):
        env = dict(os.environ)
        if os.environ.get("WATCHER_SRC"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["WATCHER_SRC"], str(REPO),
                                                              env.get("PYTHONPATH")]))
        else:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log_file = log_file
        self.start = log_file.stat().st_size if log_file.exists() else 0
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watcher.cli", *(["-v"] if debug else []),
                 "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=config.parent)  # not the checkout: "-m" puts the working directory first

    def said(self, text: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited with status {self.proc.returncode} (see {self.log_file})")
        with open(self.log_file, "rb") as f:
            f.seek(self.start)
            return text.encode() in f.read()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"the agent did not stop on SIGTERM (see {self.log_file})") from None
        if status != 0:
            raise RuntimeError(f"the agent exited with status {status} (see {self.log_file})")


def cpu_seconds() -> float:
    """CPU time used so far by the whole machine (every process, both "sides")."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def md5_hex(data: bytes) -> str:
    import hashlib
    return hashlib.md5(data).hexdigest()


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def say(message: str) -> None:
    print(message, flush=True)


def describe_machine() -> str:
    import watcher
    load = os.getloadavg()[0]
    return (f"from {Path(watcher.__file__).parent} on {os.cpu_count()} cores, "
            f"load average {load:.1f} at the end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small data sets, for development")
    p.add_argument("--scenarios", default="BCD",
                   help="which of B (A+B: plain tools and move-in), C (cp -r), D (one file) to run")
    p.add_argument("--only", nargs="*", help="data set names to run (small many large cp-2k cp-20k ...)")
    p.add_argument("--repeats", type=int, default=5, help="single-file repeats in D")
    p.add_argument("--batch", type=int, help="files_per_batch for the archive (default: watcher's)")
    p.add_argument("--settle", type=float, help="the rule's settle seconds (default: watcher's)")
    p.add_argument("--workdir", default="/dev/shm",
                   help="where the data, the watched tree and the far side go (default /dev/shm; "
                   "see README for why, and for runs on disk with --workdir /var/tmp)")
    p.add_argument("--cipher", help="the archive's ssh_cipher, used by the plain tools and the raw pipe "
                   "too (default: ssh's own choice)")
    p.add_argument("--fsync", choices=("batch", "file"), help="the archive's fsync (default: watcher's)")
    p.add_argument("--bwlimit", help="the archive's bwlimit, and rsync's for the plain tools: a link "
                   "slower than the CPUs (e.g. 100M, rsync's units; the raw pipe has none)")
    p.add_argument("--by-process", action="store_true",
                   help="A/B: CPU seconds by process name of the plain tools, the raw pipe and watcher "
                   "(perf record -a; needs perf and the right to use it)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (agent.log)")
    p.add_argument("--debug-log", action="store_true", help="agent log at DEBUG level")
    p.add_argument("--far-side", choices=("shell", "serve"), default="shell",
                   help="the archive's far_side (serve: through `watcher serve` as a forced command)")
    return p.parse_args(argv)


if __name__ == "__main__":
    Bench(parse_args()).main()
