#!/usr/bin/env bash
# Start PostgreSQL, Redis and RabbitMQ on loopback when they are installed but stopped.
# Missing services are reported; the tests then fail (CI=true) or skip.
set -u

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  else
    echo "PostgreSQL is not installed; database tests will not run" >&2
  fi
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  else
    echo "Redis is not installed; broker tests will not run" >&2
  fi
fi

# RabbitMQ: the end-to-end tests and a chaos subset run on it too (each session in a
# vhost of its own). `rabbitmqctl status` fails while the node is down.
if command -v rabbitmqctl >/dev/null; then
  if ! rabbitmqctl status >/dev/null 2>&1; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
  fi
  # await_startup waits for a node that is booting, but fails at once while the
  # freshly started VM cannot be reached yet: asked again for up to two minutes.
  started=no
  for _ in $(seq 1 60); do
    if timeout 60 rabbitmqctl await_startup >/dev/null 2>&1; then started=yes; break; fi
    sleep 2
  done
  [ "$started" = yes ] || echo "RabbitMQ did not start; its tests will not run" >&2
else
  echo "RabbitMQ is not installed; its tests will not run" >&2
fi

for _ in $(seq 1 50); do
  pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && exit 0
  sleep 0.2
done
exit 0
