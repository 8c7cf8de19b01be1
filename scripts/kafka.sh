#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, combined broker+controller) on loopback,
# run from the Maven Central jars listed in scripts/kafka/pom.xml.
#
#   scripts/kafka.sh fetch    download the jars into the cache (once)
#   scripts/kafka.sh start    format fresh storage, start, wait until it answers
#   scripts/kafka.sh stop     stop the broker started by `start`
#   scripts/kafka.sh restart [SECS]
#                             stop it and start it again on the same data
#                             (SECS seconds later: a broker that is away)
#   scripts/kafka.sh status   exit 0 when the broker answers
#
# Environment: WEIR_CACHE (default <repo>/.cache), WEIR_KAFKA_PORT (default 19092).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WEIR_CACHE:-$ROOT/.cache}"
PORT="${WEIR_KAFKA_PORT:-19092}"
CONTROLLER_PORT="$((PORT + 1))"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml")"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
RUN="$CACHE/kafka-run-$PORT"
PIDFILE="$RUN/kafka.pid"

log() { echo "kafka: $*" >&2; }

fetch() {
  if [[ -f "$LIBS/.complete" ]]; then return 0; fi
  log "fetching Apache Kafka $KAFKA_VERSION jars into $LIBS"
  rm -rf "$LIBS"
  mkdir -p "$LIBS"
  mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$LIBS" -DincludeScope=runtime
  touch "$LIBS/.complete"
}

java_cp() { java -Xmx256m -cp "$LIBS/*" "$@"; }

answers() {
  # A metadata round trip, not just an open port.
  java_cp -Dlog4j2.level=ERROR org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$PORT" --list >/dev/null 2>&1
}

write_config() {
  cat >"$RUN/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$RUN/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# The consumer group protocol (KIP-848) with test timings: a member that
# dies without leaving loses its partitions after 10 s (45 s by default),
# and assignments travel with heartbeats every second (5 s by default).
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
log.flush.interval.messages=9223372036854775807
PROPS
  cat >"$RUN/log4j2.properties" <<PROPS
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = $RUN/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = warn
logger.apache.name = org.apache.kafka
logger.apache.level = warn
PROPS
}

start() {
  fetch
  if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
    return 0
  fi
  rm -rf "$RUN"
  mkdir -p "$RUN/data"
  write_config
  local cluster_id
  cluster_id="$(java_cp org.apache.kafka.tools.StorageTool random-uuid 2>/dev/null || true)"
  if [[ -z "$cluster_id" ]]; then
    cluster_id="$(java_cp kafka.tools.StorageTool random-uuid)"
  fi
  java_cp -Dlog4j2.configurationFile="$RUN/log4j2.properties" kafka.tools.StorageTool format \
    --standalone -t "$cluster_id" -c "$RUN/server.properties" >"$RUN/format.log" 2>&1 \
    || { cat "$RUN/format.log" >&2; exit 1; }
  launch
}

# Starts the broker on the storage in $RUN and waits until it answers.
launch() {
  log "starting on 127.0.0.1:$PORT (logs in $RUN)"
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$RUN/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$RUN/server.properties" >"$RUN/stdout.log" 2>&1 &
  echo $! >"$PIDFILE"
  local deadline=$((SECONDS + 120))
  until answers; do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      log "broker exited during start-up:"; tail -50 "$RUN/stdout.log" "$RUN/server.log" >&2 || true
      exit 1
    fi
    if ((SECONDS > deadline)); then
      log "broker did not answer within 120 s"; tail -50 "$RUN/server.log" >&2 || true
      stop; exit 1
    fi
    sleep 1
  done
  log "ready on 127.0.0.1:$PORT"
}

stop() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid; pid="$(cat "$PIDFILE")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped"
  fi
  rm -f "$PIDFILE"
}

restart() {
  if [[ ! -f "$RUN/server.properties" ]]; then
    log "no broker storage in $RUN to restart; use start"; exit 1
  fi
  stop
  sleep "${1:-0}"
  launch
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  restart) restart "${2:-0}" ;;
  status) answers ;;
  *) echo "usage: $0 fetch|start|stop|restart [SECS]|status" >&2; exit 2 ;;
esac
