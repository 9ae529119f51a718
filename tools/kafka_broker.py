#!/usr/bin/env python3
"""Fetch, start and stop a real Apache Kafka (KRaft) cluster on loopback.

Used by the test fixtures, the benchmark and ``make demo``; stdlib only, so it
runs before the project's virtualenv exists.

* ``fetch``  copies the pinned ``org.apache.kafka:kafka_2.13`` jars and their
  runtime dependencies from Maven Central into a cache (once; later runs
  fetch nothing).
* ``start``  formats KRaft storage and starts N combined broker/controller
  nodes (N=1 by default; ``--nodes 3`` gives a 3-broker cluster on one
  machine), waits until every node answers a Kafka Metadata request, writes a
  state file and prints the bootstrap servers. Its JVMs outlive it; those
  of a ``KafkaCluster`` started from Python (tests, bench, demo) are killed
  with the process that started them, even by SIGKILL (Linux).
* ``stop``   stops the nodes named in the state file: SIGTERM, then SIGKILL
  after a grace period, so no JVM is left behind.

``KafkaCluster(workdir, secure=True)`` (or ``start --secure``) also opens a
``SASL_SSL`` listener on each node, with SCRAM-SHA-512 (Strimzi's default for a
KafkaUser) for the user :data:`SCRAM_USER`, and a broker certificate for
127.0.0.1 signed by a CA of its own, whose certificate it writes to
``workdir/ca.pem``. Java's ``keytool`` makes them: no other tool is needed.
Such a cluster authorizes with Kafka's ``StandardAuthorizer``, as Strimzi's
``authorization: simple`` does: the SCRAM user may do only what ACLs grant it,
while clients of the PLAINTEXT listener (``User:ANONYMOUS``) may do anything.

Python API: ``with KafkaCluster(workdir) as cluster: cluster.bootstrap_servers``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

KAFKA_VERSION = "4.1.1"
HERE = Path(__file__).resolve().parent
POM = HERE / "kafka" / "pom.xml"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-app"
STATE_FILE = "cluster.json"
#: The SCRAM-SHA-512 user of a secure cluster, and its password.
SCRAM_USER = "stream-app"
SCRAM_PASSWORD = "s3cret: with spaces & symbols"  # noqa: S105 - a throwaway test broker's
#: Of the keystores of a secure cluster; they live in its workdir only.
_STORE_PASSWORD = "changeit"  # noqa: S105

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def java_properties(text: str) -> str:
    """``text`` (``name=value`` lines) as Java's ``Properties.load`` reads it
    back: ASCII, with backslash escapes. Written as UTF-8, a data directory
    under a path with ``ö`` was another, garbled one to Kafka, which read it
    as Latin-1."""
    return "".join(map(_java_escaped, text.replace("\\", "\\\\")))


def _java_escaped(char: str) -> str:
    if ord(char) < 0x80:
        return char
    units = char.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))


def jar_dir(cache: Path = DEFAULT_CACHE, version: str = KAFKA_VERSION) -> Path:
    return cache / f"kafka-{version}" / "lib"


def _damaged_jars(lib: Path) -> list[str]:
    """The jars in ``lib`` that are not whole zip files (a cut or mangled download)."""
    damaged = []
    for jar in sorted(lib.glob("*.jar")):
        try:
            zipfile.ZipFile(jar).close()
        except (OSError, zipfile.BadZipFile):
            damaged.append(jar.name)
    return damaged


def _pom_digest() -> str:
    """What ``.complete`` holds: the jars are those of this pom.xml. A cache
    keyed by the Kafka version alone kept the jars of an older pom (a raised
    log4j version, say) on every machine that had fetched before."""
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _complete(lib: Path) -> bool:
    """Whether ``lib`` holds every jar of this pom.xml, whole."""
    marker = lib / ".complete"
    try:
        fetched = marker.read_text().strip()
    except OSError:
        return False
    return fetched == _pom_digest() and not _damaged_jars(lib)


def fetch(cache: Path = DEFAULT_CACHE, version: str = KAFKA_VERSION) -> Path:
    """Copy the broker jars into the cache unless they are already there,
    whole and fetched for this pom.xml."""
    lib = jar_dir(cache, version)
    marker = lib / ".complete"
    if marker.exists():
        if _complete(lib):
            return lib
        print(f"the cached jars in {lib} are damaged or of another pom.xml: "
              "fetching them again", file=sys.stderr)  # fmt: skip
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SystemExit("Maven (mvn) is needed once to fetch the Kafka broker jars")
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Its own directory: two first fetches at once (make demo and make test)
    # shared one, and each emptied it under the other.
    tmp = Path(tempfile.mkdtemp(prefix="lib.partial-", dir=lib.parent))
    cmd = [
        mvn,
        "-q",
        "-B",
        # A failed download is otherwise remembered in ~/.m2 (*.lastUpdated) and
        # not tried again for a day, after a mirror's hiccup too. Releases
        # already there are not fetched again.
        "-U",
        "--strict-checksums",  # a download that does not match its checksum fails
        "-f",
        str(POM),
        f"-Dkafka.version={version}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]
    print(f"fetching Apache Kafka {version} broker jars from Maven Central ...", file=sys.stderr)
    try:
        fetched = subprocess.run(cmd, check=False, stdout=sys.stderr)
        if fetched.returncode != 0:
            raise SystemExit(
                f"Maven could not fetch the Kafka {version} broker jars (exit "
                f"{fetched.returncode}; its errors are above): check the network, or "
                "the mirror in ~/.m2/settings.xml, then run again"
            )
        if not any(tmp.glob(f"kafka_2.13-{version}.jar")):
            raise SystemExit(f"Maven did not deliver kafka_2.13-{version}.jar")
        damaged = _damaged_jars(tmp)
        if damaged:
            # Maven checks the checksums of what it downloads, not of what its
            # local repository already holds: a damaged copy there stays.
            raise SystemExit(
                f"Maven delivered damaged jars: {', '.join(damaged[:3])}. Its local "
                "repository (~/.m2/repository unless settings.xml says otherwise) holds "
                f"them damaged: delete them there (find ~/.m2/repository -name "
                f"{damaged[0]}) and run again"
            )
        (tmp / ".complete").write_text(_pom_digest())
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep a cache shared by users from the others
        if _complete(lib):
            return lib  # another fetch finished first
        shutil.rmtree(lib, ignore_errors=True)
        try:
            tmp.rename(lib)
        except OSError:  # another fetch renamed its own into place meanwhile
            if not _complete(lib):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


#: The class-file version Kafka's jars are built for.
MIN_JAVA: Final = 17


def java_command() -> str:
    """The ``java`` to run Kafka with: ``$JAVA_HOME/bin/java`` (the one Maven
    uses) when set, else the first on ``PATH``; raises RuntimeError, saying
    what to do, when there is none or it is older than :data:`MIN_JAVA`."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if java is None or not Path(java).exists():
        raise RuntimeError(
            f"Java {MIN_JAVA}+ is needed to run Kafka: no java found (JAVA_HOME, PATH)"
        )
    shown = subprocess.run(
        [java, "-XshowSettings:properties", "-version"], capture_output=True, text=True, check=False
    )
    for line in shown.stderr.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name == "java.specification.version":
            major = int(value.split(".")[-1] if value.startswith("1.") else value.split(".")[0])
            if major < MIN_JAVA:
                raise RuntimeError(
                    f"Java {MIN_JAVA}+ is needed to run Kafka {KAFKA_VERSION}: {java} is Java "
                    f"{value} (set JAVA_HOME to a newer one)"
                )
            return java
    raise RuntimeError(f"cannot tell the version of {java}: {shown.stderr.strip()[:200]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> int:
    """Send a Kafka Metadata v4 request; return how many brokers the answer lists."""
    client_id = b"stream-app-probe"
    body = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    body += struct.pack(">i?", -1, False)  # all topics (null array), no auto-create
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _recv_exact(s, 4))[0]
        payload = _recv_exact(s, size)
    correlation, _throttle, brokers = struct.unpack(">iii", payload[:12])
    if correlation != 7:
        raise ConnectionError("unexpected correlation id")
    return int(brokers)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


class PortTakenError(RuntimeError):
    """A node could not bind a port :func:`free_port` had found free: another
    process took it in between."""


#: Starts tried, with new ports each, when a port was taken before Kafka bound it.
START_ATTEMPTS: Final = 3


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    pid: int | None = None
    #: The SASL_SSL listener's port (a secure cluster's nodes only).
    secure_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class KafkaCluster:
    """A KRaft cluster of ``nodes`` combined broker/controller JVMs on loopback."""

    workdir: Path
    nodes: int = 1
    heap: str = "512m"
    version: str = KAFKA_VERSION
    cache: Path = DEFAULT_CACHE
    start_timeout: float = 90.0
    secure: bool = False
    #: group.initial.rebalance.delay.ms: 0 for quick joins in tests and the demo.
    initial_rebalance_delay_ms: int = 0
    #: The JVMs die with this process, even on SIGKILL (Linux): a killed test
    #: run, demo or bench leaves no broker behind. ``start`` (the CLI) unties them.
    tied: bool = True
    members: list[Node] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.address for n in self.members)

    @property
    def secure_bootstrap_servers(self) -> str:
        """The SASL_SSL listeners of a secure cluster."""
        return ",".join(f"127.0.0.1:{n.secure_port}" for n in self.members if n.secure_port)

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signs a secure cluster's brokers."""
        return self.workdir / "ca.pem"

    def _properties(self, node: Node, voters: str) -> str:
        replication = min(3, self.nodes)
        listeners = f"PLAINTEXT://127.0.0.1:{node.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        secure: list[str] = []
        if node.secure_port is not None:
            listeners += f",SASL_SSL://127.0.0.1:{node.secure_port}"
            protocols += ",SASL_SSL:SASL_SSL"
            secure = [
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "ssl.keystore.type=PKCS12",
                f"ssl.keystore.location={self.workdir / 'broker.p12'}",
                f"ssl.keystore.password={_STORE_PASSWORD}",
                f"ssl.key.password={_STORE_PASSWORD}",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users=User:ANONYMOUS",
            ]
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node.node_id}",
                f"controller.quorum.voters={voters}",
                f"listeners={listeners},CONTROLLER://127.0.0.1:{node.controller_port}",
                f"advertised.listeners={listeners}",
                "controller.listener.names=CONTROLLER",
                f"listener.security.protocol.map={protocols}",
                "inter.broker.listener.name=PLAINTEXT",
                *secure,
                f"log.dirs={node.data_dir / 'log'}",
                "num.partitions=1",
                f"default.replication.factor={replication}",
                f"offsets.topic.replication.factor={replication}",
                "offsets.topic.num.partitions=10",
                f"transaction.state.log.replication.factor={replication}",
                f"transaction.state.log.min.isr={min(2, replication)}",
                "transaction.state.log.num.partitions=10",
                f"group.initial.rebalance.delay.ms={self.initial_rebalance_delay_ms}",
                "auto.create.topics.enable=false",
                "log.flush.interval.messages=9223372036854775807",
                "",
            ]
        )

    def start(self) -> KafkaCluster:
        """Start the nodes and wait until each answers. Ports are picked free
        but bound only by the JVM, so another process can take one in
        between: then the start is tried again with new ports."""
        for _ in range(START_ATTEMPTS - 1):
            try:
                return self._start_once()
            except PortTakenError as exc:
                print(f"{exc}: starting again on other ports", file=sys.stderr)
        return self._start_once()

    def _start_once(self) -> KafkaCluster:
        lib = fetch(self.cache, self.version)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.members = [
            Node(
                i + 1,
                free_port(),
                free_port(),
                self.workdir / f"node-{i + 1}",
                secure_port=free_port() if self.secure else None,
            )
            for i in range(self.nodes)
        ]
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.members)
        cluster_id = _kafka_uuid()
        classpath = f"{lib}/*"
        java = java_command()
        scram: list[str] = []
        if self.secure:
            _tls_material(self.workdir)
            scram = ["--add-scram", f"SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]"]
        try:
            self._launch(java, classpath, cluster_id, voters, scram)
            self._wait_ready()
        except BaseException:  # a format failed, a node did not start, a Ctrl-C
            self.stop()
            raise
        return self

    def _launch(
        self, java: str, classpath: str, cluster_id: str, voters: str, scram: list[str]
    ) -> None:
        """Format each node's storage and start its JVM; the state file names
        every node started so far, for ``stop --workdir``."""
        for node in self.members:
            shutil.rmtree(node.data_dir, ignore_errors=True)
            node.data_dir.mkdir(parents=True)
            props = node.data_dir / "server.properties"
            props.write_text(java_properties(self._properties(node, voters)), "ascii")
            log4j = node.data_dir / "log4j2.properties"
            log4j.write_text(
                java_properties(_LOG4J2.format(log=node.data_dir / "server.log")), "ascii"
            )
            jvm = [
                java,
                f"-Xmx{self.heap}",
                f"-Xms{self.heap}",
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={log4j}",
                "-cp",
                classpath,
            ]
            formatted = subprocess.run(
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                    *scram,
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if formatted.returncode != 0:
                raise RuntimeError(
                    f"formatting {node.data_dir} for Kafka failed "
                    f"(exit {formatted.returncode}): "
                    f"{(formatted.stderr or formatted.stdout).strip()[-2000:]}"
                )
            with (node.data_dir / "stdout.log").open("wb") as out:  # the JVM keeps its own fd
                command = [*jvm, "kafka.Kafka", str(props)]
                proc = subprocess.Popen(
                    tied_to_this_process(command) if self.tied else command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            node.pid = proc.pid
            self._procs.append(proc)
            self._write_state()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.members)
        while pending:
            for member, proc in zip(self.members, self._procs, strict=True):
                if proc.poll() is not None:
                    logs = (member.data_dir / "server.log", member.data_dir / "stdout.log")
                    text = "".join(log.read_text(errors="replace") for log in logs if log.exists())
                    if "Address already in use" in text:
                        raise PortTakenError(
                            f"Kafka node {member.node_id} found a port taken "
                            f"({member.port}, {member.controller_port} or {member.secure_port})"
                        )
                    raise RuntimeError(f"Kafka exited with {proc.returncode}\n{text[-3000:]}")
            node = pending[0]
            with contextlib.suppress(OSError, ConnectionError, struct.error):
                if metadata_brokers("127.0.0.1", node.port) >= self.nodes:
                    pending.pop(0)
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Kafka node {node.node_id} did not answer in {self.start_timeout}s"
                )
            time.sleep(0.2)

    def _write_state(self) -> None:
        state = {
            "bootstrap_servers": self.bootstrap_servers,
            "pids": [n.pid for n in self.members if n.pid is not None],
        }
        if self.secure:
            state["secure_bootstrap_servers"] = self.secure_bootstrap_servers
            state["ca_file"] = str(self.ca_file)
        (self.workdir / STATE_FILE).write_text(json.dumps(state))

    def detach(self) -> None:
        """Forget the JVMs without stopping them (``stop_from_state`` finds them later)."""
        self._procs.clear()

    def stop(self, grace: float = 20.0) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        self._procs.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / STATE_FILE).unlink()

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tls_material(workdir: Path) -> None:
    """A CA (its certificate in ``workdir/ca.pem``) and a broker keystore
    (``workdir/broker.p12``) with a certificate for 127.0.0.1 that it signs."""
    # The Java that runs Kafka's own: from JAVA_HOME when set, as java_command
    # finds it (a Java only there made the PATH lookup fail).
    beside = Path(java_command()).with_name("keytool")
    keytool = str(beside) if beside.exists() else shutil.which("keytool") or "keytool"
    ca, broker = workdir / "ca.p12", workdir / "broker.p12"
    for path in (ca, broker, workdir / "broker.csr", workdir / "broker.crt"):
        path.unlink(missing_ok=True)
    key = ["-keyalg", "RSA", "-keysize", "2048", "-validity", "30", "-storetype", "PKCS12"]
    password = ["-storepass", _STORE_PASSWORD, "-keypass", _STORE_PASSWORD]
    steps = [
        ["-genkeypair", "-alias", "ca", "-dname", "CN=stream-app test CA", "-ext", "bc:c",
         "-ext", "ku:c=keyCertSign,cRLSign",
         *key, "-keystore", ca, *password],
        ["-exportcert", "-rfc", "-alias", "ca", "-keystore", ca, "-storepass", _STORE_PASSWORD,
         "-file", workdir / "ca.pem"],
        ["-genkeypair", "-alias", "broker", "-dname", "CN=127.0.0.1", *key,
         "-keystore", broker, *password],
        ["-certreq", "-alias", "broker", "-keystore", broker, "-storepass", _STORE_PASSWORD,
         "-file", workdir / "broker.csr"],
        ["-gencert", "-alias", "ca", "-keystore", ca, "-storepass", _STORE_PASSWORD, "-rfc",
         "-infile", workdir / "broker.csr", "-outfile", workdir / "broker.crt",
         "-ext", "san=ip:127.0.0.1,dns:localhost", "-validity", "30"],
        ["-importcert", "-noprompt", "-alias", "ca", "-file", workdir / "ca.pem",
         "-keystore", broker, "-storepass", _STORE_PASSWORD],
        ["-importcert", "-alias", "broker", "-file", workdir / "broker.crt",
         "-keystore", broker, "-storepass", _STORE_PASSWORD],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(
            [keytool, *map(str, step)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )


def _kafka_uuid() -> str:
    """A random Kafka cluster id; never one starting with '-', which the
    storage tool would read as an option."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive, and not ours to wait for
        return False
    return True


def _node_of(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is a Kafka node of the cluster in ``workdir``. A state
    file outlives its cluster (a run killed outright, a reboot), and its pids
    may since be another process's: one of the user's, or another user's."""
    root = workdir.resolve()
    if not Path("/proc/self").exists():  # macOS: ps, without the process's directory
        shown = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return "kafka.Kafka" in shown and (str(root) in shown or str(workdir) in shown)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:  # gone, or not ours to look at
        return False
    if b"kafka.Kafka" not in args:
        return False
    return any(
        (cwd / os.fsdecode(arg)).resolve().is_relative_to(root)
        for arg in args
        if arg.endswith(b"server.properties")
    )


def running_nodes(workdir: Path) -> list[int]:
    """The pids of the cluster's nodes in ``workdir`` that still run."""
    state_path = workdir / STATE_FILE
    if not state_path.exists():
        return []
    pids = [int(p) for p in json.loads(state_path.read_text())["pids"]]
    return [pid for pid in pids if _node_of(pid, workdir)]


def stop_from_state(workdir: Path, grace: float = 20.0) -> None:
    """Stop a cluster started by another process (``start``): only the
    processes that are still its nodes."""
    state_path = workdir / STATE_FILE
    if not state_path.exists():
        return
    pids = running_nodes(workdir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            _kill_group(pid)
    state_path.unlink()


#: Run as ``python -c _TIE PARENT_PID COMMAND...``: asks Linux to SIGKILL this
#: process when the thread that started it ends (PR_SET_PDEATHSIG, kept across
#: exec), then becomes COMMAND. If the parent already died, it exits instead.
_TIE: Final = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def tied_to_this_process(command: list[str]) -> list[str]:
    """``command`` such that it is killed when this process ends, however it
    ends (Linux only; elsewhere ``command`` as it is)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _TIE, str(os.getpid()), *command]


@contextlib.contextmanager
def running_cluster(workdir: Path, nodes: int = 1) -> Iterator[KafkaCluster]:
    with KafkaCluster(workdir, nodes=nodes) as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download the broker jars into the cache")
    start = sub.add_parser("start", help="start a cluster and leave it running")
    start.add_argument("--workdir", type=Path, required=True)
    start.add_argument("--nodes", type=int, default=1)
    start.add_argument("--heap", default="512m")
    start.add_argument(
        "--secure", action="store_true", help="also a SASL_SSL (SCRAM-SHA-512) listener"
    )
    stop = sub.add_parser("stop", help="stop the cluster started in --workdir")
    stop.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        print(fetch())
    elif args.cmd == "start":
        running = running_nodes(args.workdir)
        if running:
            # Started again, it would take the running one's data directories
            # and state file, leaving it running with no way to stop it.
            print(
                f"a cluster started in {args.workdir} is running (pids "
                f"{', '.join(map(str, running))}): stop it first with "
                f"`{Path(sys.argv[0]).name} stop --workdir {args.workdir}`",
                file=sys.stderr,
            )
            return 1
        began = time.monotonic()
        cluster = KafkaCluster(
            args.workdir, nodes=args.nodes, heap=args.heap, secure=args.secure, tied=False
        ).start()
        # The JVMs outlive this process: the state file lets `stop` find them.
        cluster.detach()
        print(cluster.bootstrap_servers)
        if args.secure:
            print(
                f"SASL_SSL: {cluster.secure_bootstrap_servers}, SCRAM-SHA-512 user {SCRAM_USER} "
                f"password {SCRAM_PASSWORD!r}, CA {cluster.ca_file}"
            )
        print(f"started {args.nodes} node(s) in {time.monotonic() - began:.1f}s", file=sys.stderr)
    else:
        stop_from_state(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
