#!/usr/bin/env bash
# Local Apache Kafka (KRaft) for development and integration tests, from Maven Central jars.
# No Docker needed: Java 17+ and Maven for `fetch`, python3 for the readiness check.
#
#   kafka-local.sh fetch                                   # jars -> deploy/kafka/libs/ (once)
#   kafka-local.sh start [--nodes 1|3] [--dir DIR] [--port PORT] [--controller-port PORT] [--keep]
#   kafka-local.sh start --secure [--dir DIR] [--port PORT] [--controller-port PORT]
#   kafka-local.sh start-node --node N [--dir DIR]            # relaunch one stopped/killed node
#   kafka-local.sh stop [--dir DIR]
#   kafka-local.sh status [--dir DIR]
#
# `start` formats fresh storage (`--keep`: reuses storage already formatted in DIR, so a stopped
# broker comes back with its topics and offsets), starts the node(s) in the background, waits until
# every broker answers Kafka requests and prints the bootstrap servers as the last line of stdout
# (progress goes to stderr), so `BOOTSTRAP=$(kafka-local.sh start)` works.
# `start --secure`: one node whose client listener is SASL_SSL (SCRAM-SHA-512, a CA and a broker
# certificate for 127.0.0.1/localhost made at start with openssl) with ACLs enforced (StandardAuthorizer,
# super users `broker` and `admin`, nothing allowed without an ACL). It writes DIR/secure/client.json
# (bootstrap, protocol, mechanism, CA file, admin user and password file) and prints it as the last
# line of stdout, so `CLIENT=$(kafka-local.sh start --secure)` works.
# `start-node` brings back ONE node of a running cluster (one that was killed, e.g. by a fault test)
# with its existing config and storage, and waits until it answers and sees every running node.
# Environment: PYTHON (readiness check; --secure needs its kafka-python), KAFKA_HEAP_OPTS, KAFKA_JVM_OPTS,
# KAFKA_START_TIMEOUT (seconds, default 90), KAFKA_STOP_TIMEOUT (default 30), MAVEN_OPTS (honoured by mvn).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
LIBS="$HERE/libs"
DEFAULT_DIR="$REPO_ROOT/.run/kafka"
# Set by `start --secure`: the directory holding certificates, passwords and client.json.
SECURE_DIR=""

log() { echo "kafka-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

python_bin() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
    elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then echo "$REPO_ROOT/.venv/bin/python"
    else echo python3
    fi
}

# ---------------------------------------------------------------------------------------- fetch

cmd_fetch() {
    local stamp="$LIBS/.complete"
    # The stamp records which pom produced libs/, so editing a version re-fetches.
    if [[ -f "$stamp" ]] && cmp -s "$stamp" "$HERE/pom.xml"; then
        log "jars already in $LIBS"
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found; install Maven 3.8+ (Java 17+ is needed too)"
    log "resolving Kafka jars from Maven Central into $LIBS"
    rm -rf "$LIBS"
    mkdir -p "$LIBS"
    mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$LIBS" >&2
    ls "$LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 || die "mvn finished but no kafka_2.13 jar in $LIBS"
    cp "$HERE/pom.xml" "$stamp"
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars"
}

# ------------------------------------------------------------------------------- node bookkeeping

# Prints the pid of node directory $1 if its JVM is alive (and is really that node), else nothing.
node_pid() {
    local node_dir="$1" pid
    [[ -f "$node_dir/kafka.pid" ]] || return 0
    pid="$(cat "$node_dir/kafka.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    # Guard against a recycled pid: the process must be running this node's config.
    if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$node_dir/server.properties"; then
        echo "$pid"
    fi
}

node_dirs() {
    local dir="$1"
    compgen -G "$dir/node-*" | sort || true
}

# True if pid $1 is running; a zombie (exited, not yet reaped by init) counts as gone.
pid_alive() {
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

new_cluster_id() {
    # A Kafka Uuid string: 16 random bytes, URL-safe base64 without padding, not starting with '-'.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && { echo "$id"; return; }
    done
}

write_node_config() {
    local node_dir="$1" node_id="$2" port="$3" cport="$4" nodes="$5" voters="$6"
    local rf=1 min_isr=1
    local controlled_shutdown=true
    # `stop` ends all nodes at once; a controlled shutdown would wait (minutes) for a controller
    # quorum that is itself going away. Without it a stopped node is handled like a crash.
    if (( nodes > 1 )); then rf=3; min_isr=2; controlled_shutdown=false; fi
    {
        echo "# Generated by kafka-local.sh; regenerated on every start."
        echo "process.roles=broker,controller"
        echo "node.id=$node_id"
        if (( nodes == 1 )); then
            # Dynamic quorum (KIP-853), formatted with --standalone.
            echo "controller.quorum.bootstrap.servers=127.0.0.1:$cport"
        else
            echo "controller.quorum.voters=$voters"
        fi
        if [[ -n "$SECURE_DIR" ]]; then
            secure_listener_config "$port" "$cport"
        else
            echo "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
            echo "advertised.listeners=PLAINTEXT://127.0.0.1:$port"
            echo "controller.listener.names=CONTROLLER"
            echo "inter.broker.listener.name=PLAINTEXT"
            echo "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        fi
        echo "log.dirs=$node_dir/data"
        echo "num.partitions=3"
        echo "default.replication.factor=$rf"
        echo "min.insync.replicas=$min_isr"
        echo "offsets.topic.replication.factor=$rf"
        # Fewer internal partitions: the first consumer group is ready sooner.
        echo "offsets.topic.num.partitions=10"
        echo "transaction.state.log.replication.factor=$rf"
        echo "transaction.state.log.min.isr=$min_isr"
        echo "transaction.state.log.num.partitions=10"
        echo "share.coordinator.state.topic.replication.factor=$rf"
        echo "share.coordinator.state.topic.min.isr=$min_isr"
        echo "group.initial.rebalance.delay.ms=0"
        echo "auto.create.topics.enable=true"
        echo "delete.topic.enable=true"
        echo "num.network.threads=2"
        echo "num.io.threads=4"
        echo "num.recovery.threads.per.data.dir=1"
        echo "controlled.shutdown.enable=$controlled_shutdown"
        echo "log.retention.hours=24"
    } >"$node_dir/server.properties"
    # A secure node's config holds the broker's passwords.
    [[ -z "$SECURE_DIR" ]] || chmod 600 "$node_dir/server.properties"
}

# ------------------------------------------------------------------------------------ --secure

random_password() {
    # Letters and digits only: the password goes into JAAS and --add-scram strings unquoted.
    head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24
}

# Makes $SECURE_DIR afresh: a CA, a broker certificate for 127.0.0.1/localhost signed by it (PKCS12
# keystore), the broker and admin passwords, and client.json for bootstrap servers $1.
make_secure_dir() {
    local bootstrap="$1" d="$SECURE_DIR"
    command -v openssl >/dev/null || die "openssl not found; --secure makes its certificates with it"
    rm -rf "$d"
    mkdir -p "$d"
    chmod 700 "$d"
    log "making a CA and a broker certificate in $d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=kafka-local test CA" \
        -keyout "$d/ca.key" -out "$d/ca.pem" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$d/broker.key" -out "$d/broker.csr" \
        2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$d/broker.ext"
    openssl x509 -req -in "$d/broker.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
        -extfile "$d/broker.ext" -out "$d/broker.pem" 2>/dev/null
    random_password >"$d/keystore.password"
    random_password >"$d/broker.password"
    random_password >"$d/admin.password"
    openssl pkcs12 -export -in "$d/broker.pem" -inkey "$d/broker.key" -certfile "$d/ca.pem" -name broker \
        -out "$d/broker.p12" -passout "file:$d/keystore.password"
    rm -f "$d/broker.csr" "$d/broker.ext" "$d/ca.srl"
    chmod 600 "$d"/*.key "$d"/*.password "$d/broker.p12"
    "$(python_bin)" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
        bootstrap_servers "$bootstrap" security_protocol SASL_SSL sasl_mechanism SCRAM-SHA-512 \
        ssl_cafile "$d/ca.pem" admin_username admin admin_password_file "$d/admin.password" >"$d/client.json"
}

# The listener part of a --secure node's server.properties (client port $1, controller port $2).
secure_listener_config() {
    local port="$1" cport="$2" d="$SECURE_DIR" broker_pw
    broker_pw="$(cat "$d/broker.password")"
    echo "listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
    echo "advertised.listeners=SASL_SSL://127.0.0.1:$port"
    echo "controller.listener.names=CONTROLLER"
    echo "inter.broker.listener.name=SASL_SSL"
    # The controller listener authenticates too (PLAIN: KRaft controllers cannot use SCRAM, whose
    # credentials live in the metadata they serve); an open one would let anyone act as the cluster.
    echo "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT"
    echo "sasl.enabled.mechanisms=SCRAM-SHA-512"
    echo "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512"
    echo "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"broker\" password=\"$broker_pw\";"
    echo "sasl.mechanism.controller.protocol=PLAIN"
    echo "listener.name.controller.sasl.enabled.mechanisms=PLAIN"
    echo "listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"broker\" password=\"$broker_pw\" user_broker=\"$broker_pw\";"
    echo "ssl.keystore.type=PKCS12"
    echo "ssl.keystore.location=$d/broker.p12"
    echo "ssl.keystore.password=$(cat "$d/keystore.password")"
    echo "ssl.truststore.type=PEM"
    echo "ssl.truststore.location=$d/ca.pem"
    echo "ssl.endpoint.identification.algorithm=https"
    echo "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    echo "super.users=User:broker;User:admin"
    echo "allow.everyone.if.no.acl.found=false"
}

# True if every node directory of $1 (for $2 nodes) holds formatted KRaft storage.
formatted() {
    local dir="$1" nodes="$2" i
    for (( i = 1; i <= nodes; i++ )); do
        [[ -f "$dir/node-$i/data/meta.properties" ]] || return 1
    done
}

# Deletes any earlier state in $1 and formats fresh storage for $2 nodes under a new cluster id.
format_storage() {
    local dir="$1" nodes="$2" port="$3" cport="$4" voters="$5" cluster_id nd i
    # A test broker starts empty: stale data from an earlier run would hide bugs.
    rm -rf "$dir"/node-* "$dir/bootstrap"
    [[ -n "$SECURE_DIR" ]] || rm -rf "$dir/secure"
    cluster_id="$(new_cluster_id)"
    log "formatting $nodes node(s) in $dir (cluster id $cluster_id)"
    local -a format_pids=()
    for (( i = 0; i < nodes; i++ )); do
        nd="$dir/node-$((i + 1))"
        mkdir -p "$nd/logs"
        write_node_config "$nd" $((i + 1)) $((port + i)) $((cport + i)) "$nodes" "$voters"
        local -a standalone=()
        (( nodes == 1 )) && standalone=(--standalone)
        if [[ -n "$SECURE_DIR" ]]; then
            # SCRAM users exist from the first start (KRaft stores them in the metadata log).
            standalone+=(--add-scram "SCRAM-SHA-512=[name=broker,password=$(cat "$SECURE_DIR/broker.password")]"
                         --add-scram "SCRAM-SHA-512=[name=admin,password=$(cat "$SECURE_DIR/admin.password")]")
        fi
        java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
            -Dkafka.logs.dir="$nd/logs" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
            -cp "$LIBS/*" kafka.tools.StorageTool format \
            --cluster-id "$cluster_id" --config "$nd/server.properties" "${standalone[@]}" \
            >"$nd/format.log" 2>&1 &
        format_pids+=($!)
    done
    for (( i = 0; i < nodes; i++ )); do
        if ! wait "${format_pids[$i]}"; then
            cat "$dir/node-$((i + 1))/format.log" >&2
            die "formatting storage for node $((i + 1)) failed"
        fi
    done
}

# ---------------------------------------------------------------------------------------- start

# Starts the JVM of node directory $1 (its server.properties and storage must exist) in the background.
launch_node() {
    local nd="$1" heap="${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m}"
    # setsid: the broker outlives this script and ignores the caller's Ctrl-C;
    # `stop` (or the pytest fixture) ends it.
    # shellcheck disable=SC2086  # heap/JVM options are word lists on purpose
    setsid java $heap -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true ${KAFKA_JVM_OPTS:-} \
        -Dkafka.logs.dir="$nd/logs" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
        -cp "$LIBS/*" kafka.Kafka "$nd/server.properties" \
        >>"$nd/logs/console.log" 2>&1 </dev/null &
    echo $! >"$nd/kafka.pid"
}

cmd_start() {
    local nodes=1 dir="$DEFAULT_DIR" port=9092 cport="" keep=0 secure=0
    while (( $# )); do
        case "$1" in
            --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
            --keep) keep=1; shift ;;
            --secure) secure=1; shift ;;
            --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
            --port) port="${2:?--port needs a value}"; shift 2 ;;
            --controller-port) cport="${2:?--controller-port needs a value}"; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown option for start: $1" ;;
        esac
    done
    [[ "$nodes" == 1 || "$nodes" == 3 ]] || die "--nodes must be 1 or 3, got $nodes"
    if (( secure )); then
        (( nodes == 1 )) || die "--secure runs one node, got --nodes $nodes"
        (( keep == 0 )) || die "--secure makes new certificates and users on every start; --keep is not supported"
    fi
    [[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
    cport="${cport:-$((port + 100))}"
    [[ "$cport" =~ ^[0-9]+$ ]] || die "--controller-port must be a number, got $cport"
    command -v java >/dev/null || die "java not found; Java 17+ is required"
    ls "$LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 || die "no Kafka jars in $LIBS; run: $0 fetch"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    local bootstrap="" voters="" i
    for (( i = 0; i < nodes; i++ )); do
        bootstrap+="${bootstrap:+,}127.0.0.1:$((port + i))"
        voters+="${voters:+,}$((i + 1))@127.0.0.1:$((cport + i))"
    done

    # Already running: same layout -> report it; different -> refuse rather than guess.
    local running=0 nd
    for nd in $(node_dirs "$dir"); do
        [[ -n "$(node_pid "$nd")" ]] && running=$((running + 1))
    done
    if (( running > 0 )); then
        local was_secure=0
        [[ -f "$dir/secure/client.json" ]] && was_secure=1
        if [[ -f "$dir/bootstrap" && "$(cat "$dir/bootstrap")" == "$bootstrap" ]] && (( running == nodes )) \
                && (( was_secure == secure )); then
            log "already running in $dir"
            wait_ready "$dir" "$bootstrap" "$nodes"
            start_output "$dir" "$bootstrap"
            return 0
        fi
        die "a different Kafka is running in $dir ($running node(s)); run: $0 stop --dir $dir"
    fi

    for (( i = 0; i < nodes; i++ )); do
        port_in_use $((port + i)) && die "port $((port + i)) is already in use (pick another --port)"
        port_in_use $((cport + i)) && die "controller port $((cport + i)) is already in use (pick --controller-port)"
    done

    local started_at
    started_at=$(date +%s.%N)
    if (( keep )) && formatted "$dir" "$nodes"; then
        # Restart on the same storage: topics, records and committed group offsets survive. Only the
        # config is rewritten; use the same ports as before (the KRaft log records the controller's).
        log "reusing formatted storage of $nodes node(s) in $dir"
        for (( i = 0; i < nodes; i++ )); do
            write_node_config "$dir/node-$((i + 1))" $((i + 1)) $((port + i)) $((cport + i)) "$nodes" "$voters"
        done
    else
        if (( keep )); then log "--keep: no formatted storage for $nodes node(s) in $dir; formatting it"; fi
        if (( secure )); then
            SECURE_DIR="$dir/secure"
            make_secure_dir "$bootstrap"
        fi
        format_storage "$dir" "$nodes" "$port" "$cport" "$voters"
    fi

    for (( i = 0; i < nodes; i++ )); do
        launch_node "$dir/node-$((i + 1))"
    done
    echo "$bootstrap" >"$dir/bootstrap"

    if ! wait_ready "$dir" "$bootstrap" "$nodes"; then
        for nd in $(node_dirs "$dir"); do
            log "---- tail of $nd/logs/server.log"
            tail -n 30 "$nd/logs/server.log" >&2 2>/dev/null || true
            log "---- tail of $nd/logs/console.log"
            tail -n 20 "$nd/logs/console.log" >&2 2>/dev/null || true
        done
        cmd_stop --dir "$dir" || true
        die "Kafka did not become ready; logs are in $dir/node-*/logs"
    fi
    log "ready in $(awk -v s="$started_at" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')s;" \
        "logs: $dir/node-*/logs/server.log"
    start_output "$dir" "$bootstrap"
}

# The last line of `start`: client.json for a --secure broker, else the bootstrap servers $2.
start_output() {
    if [[ -f "$1/secure/client.json" ]]; then cat "$1/secure/client.json"; else echo "$2"; fi
}

# Polls (short waits between checks) until every broker of $2 (comma-separated) answers a Kafka
# metadata request and sees at least $3 brokers; fails fast if one of the JVMs $4 (comma-separated
# pids; default: every node of $1) exits. Without kafka-python it falls back to "port open and
# 'Kafka Server started' logged".
wait_ready() {
    local dir="$1" bootstrap="$2" nodes="$3" pids="${4:-}" nd
    if [[ -z "$pids" ]]; then
        for nd in $(node_dirs "$dir"); do pids+="${pids:+,}$(cat "$nd/kafka.pid")"; done
    fi
    "$(python_bin)" - "$bootstrap" "$nodes" "$pids" "${KAFKA_START_TIMEOUT:-90}" "$dir" <<'PY'
import glob, json, logging, os, socket, sys, time

bootstrap, nodes, pids, timeout, run_dir = sys.argv[1:6]
addrs, nodes, deadline = bootstrap.split(","), int(nodes), time.monotonic() + float(timeout)
logging.getLogger("kafka").setLevel(logging.CRITICAL)
try:
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError
except ImportError:
    KafkaAdminClient = KafkaConfigurationError = None
    print("kafka-local: kafka-python not importable; readiness = port open + log line", file=sys.stderr)

def security():
    """kafka-python options for a --secure broker (its admin user), else none."""
    try:
        with open(os.path.join(run_dir, "secure", "client.json")) as f:
            client = json.load(f)
    except FileNotFoundError:
        return {}
    with open(client["admin_password_file"]) as f:
        password = f.read().strip()
    return {"security_protocol": client["security_protocol"], "sasl_mechanism": client["sasl_mechanism"],
            "sasl_plain_username": client["admin_username"], "sasl_plain_password": password,
            "ssl_cafile": client["ssl_cafile"]}

SECURITY = security()

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False

def ready(addr):
    if KafkaAdminClient is None:
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            pass
        logs = glob.glob(os.path.join(run_dir, "node-*", "logs", "server.log"))
        return sum("Kafka Server started" in open(p, errors="replace").read() for p in logs) >= nodes
    admin = KafkaAdminClient(bootstrap_servers=addr, request_timeout_ms=5000,
                             bootstrap_timeout_ms=2000, client_id="kafka-local-ready", **SECURITY)
    try:
        return len(admin.describe_cluster()["brokers"]) >= nodes
    finally:
        admin.close()

last = "not tried"
while time.monotonic() < deadline:
    dead = [p for p in pids.split(",") if not alive(p)]
    if dead:
        sys.exit(f"kafka-local: broker JVM(s) {','.join(dead)} exited during start-up")
    try:
        if all(ready(a) for a in addrs):
            sys.exit(0)
        last = "not all brokers registered yet"
    except Exception as e:  # noqa: BLE001 - a broker still starting fails in many ways
        if KafkaConfigurationError is not None and isinstance(e, KafkaConfigurationError):
            raise  # our bug, not "not ready yet"
        last = f"{type(e).__name__}: {e}"
    time.sleep(0.25)
sys.exit(f"kafka-local: not ready after {timeout}s ({last})")
PY
}

# ----------------------------------------------------------------------------------- start-node

# Relaunches node N of the cluster in --dir on its existing config and storage (ports, node id and
# data unchanged, so it rejoins as the same broker and controller voter), then waits until it answers
# and sees every node whose JVM is running. A node that is already running is only waited for.
cmd_start_node() {
    local dir="$DEFAULT_DIR" node=""
    while (( $# )); do
        case "$1" in
            --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
            --node) node="${2:?--node needs a value}"; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown option for start-node: $1" ;;
        esac
    done
    [[ "$node" =~ ^[0-9]+$ ]] || die "start-node needs --node N (a number), got '${node}'"
    [[ -d "$dir" ]] || die "no Kafka set up in $dir; run: $0 start --dir $dir"
    dir="$(cd "$dir" && pwd)"
    local nd="$dir/node-$node"
    [[ -f "$nd/server.properties" && -f "$nd/data/meta.properties" ]] \
        || die "no formatted node $node in $dir; start the cluster first ($0 start --dir $dir)"
    local port pid started_at
    port="$(sed -n 's|^listeners=[A-Z_]*://127.0.0.1:\([0-9]*\),.*|\1|p' "$nd/server.properties")"
    [[ -n "$port" ]] || die "cannot read the client port of node $node from $nd/server.properties"
    started_at=$(date +%s.%N)
    pid="$(node_pid "$nd")"
    if [[ -n "$pid" ]]; then
        log "node $node already running (pid $pid)"
    else
        port_in_use "$port" && die "port $port of node $node is taken by another process"
        log "starting node $node on its existing storage"
        launch_node "$nd"
        pid="$(cat "$nd/kafka.pid")"
    fi
    local running=0 other
    for other in $(node_dirs "$dir"); do
        [[ -n "$(node_pid "$other")" ]] && running=$((running + 1))
    done
    if ! wait_ready "$dir" "127.0.0.1:$port" "$running" "$pid"; then
        log "---- tail of $nd/logs/server.log"
        tail -n 30 "$nd/logs/server.log" >&2 2>/dev/null || true
        die "node $node did not become ready; logs are in $nd/logs"
    fi
    log "node $node ready in $(awk -v s="$started_at" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')s"
}

# ----------------------------------------------------------------------------------- stop, status

cmd_stop() {
    local dir="$DEFAULT_DIR"
    while (( $# )); do
        case "$1" in
            --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown option for stop: $1" ;;
        esac
    done
    [[ -d "$dir" ]] || { log "nothing to stop in $dir"; return 0; }
    dir="$(cd "$dir" && pwd)"
    local -a pids=()
    local nd pid
    for nd in $(node_dirs "$dir"); do
        pid="$(node_pid "$nd")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    if (( ${#pids[@]} == 0 )); then
        log "not running ($dir)"
    else
        log "stopping pid(s) ${pids[*]}"
        local deadline=$((SECONDS + ${KAFKA_STOP_TIMEOUT:-30})) left
        while :; do
            left=()
            for pid in "${pids[@]}"; do pid_alive "$pid" && left+=("$pid"); done
            (( ${#left[@]} == 0 )) && break
            if (( SECONDS >= deadline )); then
                log "still running after ${KAFKA_STOP_TIMEOUT:-30}s, sending SIGKILL to ${left[*]}"
                kill -KILL "${left[@]}" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        log "stopped"
    fi
    for nd in $(node_dirs "$dir"); do rm -f "$nd/kafka.pid"; done
}

cmd_status() {
    local dir="$DEFAULT_DIR"
    while (( $# )); do
        case "$1" in
            --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown option for status: $1" ;;
        esac
    done
    local total=0 up=0 nd pid
    for nd in $(node_dirs "$dir"); do
        total=$((total + 1))
        pid="$(node_pid "$nd")"
        if [[ -n "$pid" ]]; then
            up=$((up + 1))
            echo "$(basename "$nd"): running (pid $pid)"
        else
            echo "$(basename "$nd"): stopped"
        fi
    done
    if (( total == 0 )); then echo "no Kafka set up in $dir"; return 3; fi
    (( up > 0 )) && echo "bootstrap: $(cat "$dir/bootstrap" 2>/dev/null)"
    (( up == total )) && return 0
    (( up == 0 )) && return 3
    return 1
}

case "${1:-}" in
    fetch) shift; cmd_fetch "$@" ;;
    start) shift; cmd_start "$@" ;;
    start-node) shift; cmd_start_node "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) usage ;;
esac
