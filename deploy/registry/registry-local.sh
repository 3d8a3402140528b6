#!/usr/bin/env bash
# Local schema registry (Apicurio Registry 2.4.2.Final, Apache-2.0) for development and integration tests,
# built from Maven Central jars. No Docker: Java 17 and Maven for `fetch`, Java 17 to run.
#
#   registry-local.sh fetch                        # build once -> deploy/registry/target/ (quiet, idempotent)
#   registry-local.sh start [PORT] [--data DIR]    # run in the foreground on 127.0.0.1:PORT (default 8081)
#
# Clients use the Confluent-compatible API: http://127.0.0.1:PORT/apis/ccompat/v7 (readiness: /health/ready).
# `start` execs the JVM, so the caller's child process IS the registry (signals reach it directly).
# Storage: without --data, in-memory H2 (schemas are lost when it stops); with --data DIR, an H2 file
# in DIR, so a registry restarted on the same DIR keeps its schemas and their ids, as a real one does.
# Environment: REGISTRY_JAVA_HOME (a Java 17; default: JAVA_HOME if it is 17, else /usr/lib/jvm/*17*),
# REGISTRY_JAVA_OPTS (default: a small heap, serial GC, C1 only: ready in ~4 s, ~190 MB RSS),
# MAVEN_OPTS (honoured by mvn).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET="$HERE/target"
RUNNER="$TARGET/registry-local-1-runner.jar"
DEFAULT_JAVA_OPTS="-Xmx192m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"

log() { echo "registry-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The major version of the java in JDK/JRE directory $1, or nothing (its `release` file saves starting a JVM).
java_major() {
    if [[ -f "$1/release" ]]; then
        sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$1/release"
    else
        "$1/bin/java" -XshowSettings:properties -version 2>&1 \
            | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p'
    fi
}

# Quarkus 2.16 targets Java 17; a newer default java may be installed next to it, so pick 17 explicitly.
java17_home() {
    local candidate
    for candidate in "${REGISTRY_JAVA_HOME:-}" "${JAVA_HOME:-}" /usr/lib/jvm/*17*; do
        [[ -n "$candidate" && -x "$candidate/bin/java" ]] || continue
        if [[ "$(java_major "$candidate")" == 17 ]]; then
            echo "$candidate"
            return 0
        fi
    done
    die "no Java 17 found (set REGISTRY_JAVA_HOME); on Debian/Ubuntu: apt-get install openjdk-17-jre-headless"
}

# ---------------------------------------------------------------------------------------- fetch

cmd_fetch() {
    local stamp="$TARGET/.complete" want
    # The stamp records which pom and settings produced target/, so editing a version rebuilds.
    want="$(cat "$HERE/pom.xml" "$HERE/maven-settings.xml" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && -f "$RUNNER" && "$(cat "$stamp")" == "$want" ]]; then
        log "already built: $RUNNER"
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found; install Maven 3.8+ (and Java 17)"
    local java_home
    java_home="$(java17_home)"
    log "building Apicurio Registry from Maven Central into $TARGET (first time: ~210 MB, under a minute)"
    rm -rf "$TARGET"
    # -s: our settings send every repository the parent poms declare (JitPack, Eclipse) to Central.
    # mvn's output (even -q prints terminal escapes) is shown only when the build fails.
    local out
    out="$(mktemp)"
    if ! JAVA_HOME="$java_home" mvn -q -B -s "$HERE/maven-settings.xml" -f "$HERE/pom.xml" package >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        die "mvn package failed (output above)"
    fi
    rm -f "$out"
    [[ -f "$RUNNER" ]] || die "mvn finished but $RUNNER is missing"
    echo "$want" >"$stamp"
    log "built: $RUNNER ($(find "$TARGET/lib" -name '*.jar' | wc -l) jars)"
}

# ---------------------------------------------------------------------------------------- start

cmd_start() {
    local port=8081 data=""
    while (( $# )); do
        case "$1" in
            --data) [[ $# -ge 2 ]] || usage; data="$2"; shift 2 ;;
            [0-9]*) port="$1"; shift ;;
            *) usage ;;
        esac
    done
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    [[ -f "$RUNNER" ]] || die "not built yet: run '$0 fetch' first"
    local java_home url="jdbc:h2:mem:registry_db"
    java_home="$(java17_home)"
    if [[ -n "$data" ]]; then
        mkdir -p "$data"
        url="jdbc:h2:file:$(cd "$data" && pwd)/registry"
    fi
    log "starting on http://127.0.0.1:$port/apis/ccompat/v7 (storage: $url)"
    # The app's prod profile reads its JDBC URL from REGISTRY_DATASOURCE_URL (default: in-memory H2).
    # shellcheck disable=SC2086  # REGISTRY_JAVA_OPTS is a list of JVM flags
    REGISTRY_DATASOURCE_URL="$url" exec "$java_home/bin/java" ${REGISTRY_JAVA_OPTS:-$DEFAULT_JAVA_OPTS} \
        -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" -jar "$RUNNER"
}

case "${1:-}" in
    fetch) shift; cmd_fetch "$@" ;;
    start) shift; cmd_start "$@" ;;
    *) usage ;;
esac
