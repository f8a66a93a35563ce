#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: `source ci/postgres.sh` initialises one in a
# temporary directory (as the postgres user when root), starts it on a free port of 127.0.0.1,
# exports MCIM_TEST_POSTGRES=postgres://USER@127.0.0.1:PORT, and stops and removes it when the
# sourcing shell exits. Needs Debian's postgresql package (ci/install-deps.sh installs it).
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  echo "ci/postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2
  return 1 2>/dev/null || exit 1
fi
pg_dir=$(mktemp -d /tmp/mcim-pg.XXXXXX)
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$pg_dir"
  pg_as() { runuser -u postgres -- "$@"; }
  pg_user=postgres
else
  pg_as() { "$@"; }
  pg_user=$(id -un)
fi
pg_as "$pg_bin/initdb" -D "$pg_dir/data" -A trust -E UTF8 -U "$pg_user" --no-sync >/dev/null
pg_port=""
for _ in 1 2 3 4 5; do
  p=$((20000 + RANDOM % 20000))
  if pg_as "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w -t 30 \
       -o "-p $p -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off -c full_page_writes=off" \
       start >/dev/null; then
    pg_port=$p
    break
  fi
done
if [ -z "$pg_port" ]; then
  echo "ci/postgres.sh: the cluster did not start:" >&2
  cat "$pg_dir/log" >&2
  return 1 2>/dev/null || exit 1
fi
pg_stop() {
  pg_as "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
trap pg_stop EXIT
export MCIM_TEST_POSTGRES="postgres://$pg_user@127.0.0.1:$pg_port"
echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port ($pg_dir)"
