# Sourced by the benchmark scripts: wait (up to ~10 min) for the 1-minute load average to drop
# below MAX_LOAD (default 1.0), then print the load at start.
wait_quiet() {
  local load
  for _ in $(seq 60); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="${MAX_LOAD:-1.0}" 'BEGIN{exit !(l < m)}'; then break; fi
    echo "load $load >= ${MAX_LOAD:-1.0}, waiting..." >&2; sleep 10
  done
  echo "load at start: $(cat /proc/loadavg)"
}
