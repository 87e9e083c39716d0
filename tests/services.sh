#!/usr/bin/env bash
# Start the Redis and PostgreSQL that the scale-out and Postgres tests use (127.0.0.1:6379 and :5432),
# when they are installed here but not running. Never fails: without them those tests are skipped,
# unless FLUXTEST_REQUIRE_SERVICES=1 (as in .ci/run) turns a missing service into a failure.
set -u

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port name
    for _ in $(seq 1 60); do
        listening "$1" && return 0
        sleep 0.5
    done
    echo "tests/services.sh: $2 did not come up on 127.0.0.1:$1" >&2
    return 1
}

if ! listening 6379; then
    if command -v redis-server >/dev/null; then
        echo "tests/services.sh: starting Redis on 127.0.0.1:6379"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir /tmp --logfile /tmp/fluxbot-test-redis.log
        wait_for 6379 Redis
    else
        echo "tests/services.sh: no Redis here (apt install redis-server); scale-out tests will skip" >&2
    fi
fi

if ! listening 5432; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        echo "tests/services.sh: starting PostgreSQL on 127.0.0.1:5432"
        for version in /etc/postgresql/*; do
            pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start
        done
        wait_for 5432 PostgreSQL
    else
        echo "tests/services.sh: no PostgreSQL here (apt install postgresql); Postgres tests will skip" >&2
    fi
fi
exit 0
