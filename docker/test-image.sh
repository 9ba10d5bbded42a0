#!/usr/bin/env bash
# The CPU image built and run for real (make image-test; docs/deployment.md, "Testing the image"):
#   1. builds it offline, from a local base image (docker/local-base.sh) and a local wheel index (the lock's
#      wheels, `pip download`ed and served on the loopback), with the network shut to pip and apt;
#   2. runs it as docker-compose.cpu.yml runs its service: read-only root, tmpfs /tmp, no capabilities,
#      no-new-privileges, the image's non-root user, the model store read-only, a /cache volume;
#   3. waits until its HEALTHCHECK reports healthy, then checks it over HTTP (tests/deploy/running_image.py:
#      Fashion-MNIST PNGs classified as the model does offline, /metrics, /v2/health/ready);
#   4. `docker stop`: exit 0 and the drain lines in its log;
#   5. waits, before that stop, until the first start has compiled its ahead-of-time packages into the
#      volume (a start that misses the compile cache serves with torch.compile and fills it in the background);
#   6. starts a new container on the same /cache volume, checks that it loaded every package and compiled
#      nothing, checks it again over HTTP and stops it the same way;
#   7. prints the image size, both ready times and the seconds the cache took to fill.
#
# Without DOCKER_HOST it starts a Docker engine of its own for the run (root; vfs storage, no bridge, no
# NAT rules) and stops it at the end; containers use the host's network and listen on 127.0.0.1 only.
# Settings (environment): IMAGE_TEST_DIR (engine data, wheels, logs; default /var/tmp/igcv2-image-test:
# delete it for a cold run), BASE_IMAGE, IMAGE, WHEEL_PORT (the wheel index's port, fixed so the build
# cache holds), PYTHON (the project's virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."

state=${IMAGE_TEST_DIR:-/var/tmp/igcv2-image-test}
base=${BASE_IMAGE:-igcv2-base/python:3.11-bookworm}
image=${IMAGE:-igcv2:test-cpu}
wheel_port=${WHEEL_PORT:-38601}
python=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.:tests  # this checkout's packages and the tests' helpers, whatever the venv has installed
export DOCKER_BUILDKIT=0   # the legacy builder: no BuildKit on these engines
name=igcv2-image-test-$$
volume=$name-cache
started=$SECONDS

step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)); }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
    set +e
    docker rm -f "$name" >/dev/null 2>&1
    docker volume rm "$volume" >/dev/null 2>&1
    stop_wheel_index
    if [ -n "${engine:-}" ]; then
        kill "$engine" && wait "$engine"
        umount "$state/exec/netns/default" 2>/dev/null  # the host network's handle, left mounted by dockerd
        echo "engine stopped"
    fi
}

start_engine() {
    [ "$(id -u)" = 0 ] || fail "starting a Docker engine needs root (or set DOCKER_HOST to a running one)"
    export DOCKER_HOST=unix://$state/docker.sock
    dockerd --storage-driver=vfs --bridge=none --iptables=false --ip-forward=false \
        --data-root "$state/engine" --exec-root "$state/exec" -H "$DOCKER_HOST" --pidfile "$state/dockerd.pid" \
        >"$state/dockerd.log" 2>&1 &
    engine=$!
    for _ in $(seq 120); do
        docker version >/dev/null 2>&1 && return
        kill -0 "$engine" 2>/dev/null || fail "dockerd exited: $(tail -5 "$state/dockerd.log")"
        sleep 0.5
    done
    fail "dockerd did not answer within 60 s ($state/dockerd.log)"
}

# The lock's wheels, every file checked against its hash; fetched once per lock (pip's own settings say
# where from: torch's CPU wheel is on https://download.pytorch.org/whl/cpu, or a local folder).
local_wheels() {
    local lock=requirements/service-cpu.txt wheels=$state/wheels-cpu
    local stamp; stamp=$(sha256sum "$lock" | cut -d' ' -f1)
    if [ "$(cat "$wheels/.lock-sha256" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$wheels"
        "$python" -m pip download --require-hashes -r "$lock" -d "$wheels" >"$state/pip-download.log" 2>&1 ||
            { tail -20 "$state/pip-download.log"; fail "pip download (whole log: $state/pip-download.log)"; }
        echo "$stamp" >"$wheels/.lock-sha256"
    fi
    "$python" -m http.server --bind 127.0.0.1 --directory "$wheels" "$wheel_port" >"$state/wheels.log" 2>&1 &
    wheel_server=$!
    for _ in $(seq 50); do
        "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$wheel_port/', timeout=1)" 2>/dev/null &&
            return
        sleep 0.2
    done
    fail "the wheel index did not start on 127.0.0.1:$wheel_port ($state/wheels.log)"
}

stop_wheel_index() {
    if [ -n "${wheel_server:-}" ]; then
        kill "$wheel_server"
        wait "$wheel_server" 2>/dev/null || true
        wheel_server=
    fi
}

# Offline: pip sees only the local index, and pip and apt find every other host behind a closed proxy.
build() {
    local args=(--network host -f docker/Dockerfile
        --build-arg PYTHON_IMAGE="$base" --build-arg TORCH_BUILD=cpu
        --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:$wheel_port/"
        --build-arg http_proxy=http://127.0.0.1:9 --build-arg https_proxy=http://127.0.0.1:9
        --build-arg no_proxy=127.0.0.1)
    local old new id
    old=$(docker image inspect -f '{{.Id}}' "$image-build" "$image" 2>/dev/null || true)
    # The build stage gets a tag too: its layers are the cache of the next build, not dangling images.
    if ! docker build "${args[@]}" --target build -t "$image-build" . >"$state/build.log" 2>&1 ||
        ! docker build "${args[@]}" -t "$image" . >>"$state/build.log" 2>&1; then
        tail -40 "$state/build.log"
        fail "docker build (whole log: $state/build.log)"
    fi
    # What this replaced is removed, with the layers nothing else uses (vfs keeps a full copy per layer).
    new=$(docker image inspect -f '{{.Id}}' "$image-build" "$image")
    for id in $old; do
        grep -qx "$id" <<<"$new" || docker rmi "$id" >/dev/null
    done
}

# Starts a container on $volume and waits until GET /health/ready answers 200 (sets $url, $grpc and $ready,
# the seconds from the container's start to that answer), then until the HEALTHCHECK reports healthy.
start_container() {
    local ports args t0
    mapfile -t ports < <("$python" -c "import socket
sockets = [socket.create_server(('127.0.0.1', 0)) for _ in range(2)]
print(*(s.getsockname()[1] for s in sockets), sep='\n')")
    mapfile -t args < <("$python" tests/deploy/running_image.py "${ports[@]}" "$volume")
    [ "${#args[@]}" -gt 5 ] || fail "no docker run options from docker-compose.cpu.yml"
    url=http://127.0.0.1:${ports[0]}
    grpc=127.0.0.1:${ports[1]}
    t0=$(now)
    docker run -d --name "$name" "${args[@]}" "$image" >/dev/null
    echo "docker run: $(since "$t0") s to create and start the container"
    t0=$(now)
    until curl -fsS -o /dev/null --max-time 2 "$url/health/ready" 2>/dev/null; do
        [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] ||
            { docker logs "$name" 2>&1 | tail -30; fail "the container exited"; }
        [ "$(since "$t0" | cut -d. -f1)" -lt 900 ] || fail "not ready after 900 s"
        sleep 0.25
    done
    ready=$(since "$t0")
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ]; do
        [ "$(since "$t0" | cut -d. -f1)" -lt $((${ready%.*} + 120)) ] || fail "HEALTHCHECK not healthy 120 s after ready"
        sleep 1
    done
    echo "ready after $ready s (GET /health/ready 200); HEALTHCHECK healthy after $(since "$t0") s"
}

# What the compose options promise, seen from inside: the image's non-root user, no capabilities,
# no-new-privileges, a read-only root and a writable /tmp.
check_lockdown() {
    local status uid
    status=$(docker exec "$name" cat /proc/1/status)
    uid=$(docker image inspect -f '{{.Config.User}}' "$image" | cut -d: -f1)
    [ "${uid:-0}" != 0 ] || fail "the image's USER is root"
    grep -Eq "^Uid:\s+$uid\s" <<<"$status" || fail "the service does not run as uid $uid"
    grep -Eq '^CapEff:\s+0+$' <<<"$status" || fail "the service has capabilities"
    grep -Eq '^NoNewPrivs:\s+1$' <<<"$status" || fail "no-new-privileges is off"
    ! docker exec "$name" touch /probe 2>/dev/null || fail "the root filesystem is writable"
    docker exec "$name" sh -c 'touch /tmp/probe && rm /tmp/probe' || fail "/tmp is not writable"
    echo "locked down: uid $uid, no capabilities, no-new-privileges, read-only root"
}

check_container() {
    check_lockdown
    IGCV2_IMAGE_URL=$url IGCV2_IMAGE_GRPC=$grpc "$python" -m pytest -q -p no:cacheprovider tests/deploy/running_image.py ||
        fail "checks of the running container"
}

# The first start missed the compile cache: wait until its background compile has filled /cache/aot.
wait_for_packages() {
    local t0; t0=$(now)
    until docker logs "$name" 2>&1 | grep -q "compiled here"; do
        ! docker logs "$name" 2>&1 | grep -q "precompile FAILED" || fail "the background compile failed"
        [ "$(since "$t0" | cut -d. -f1)" -lt 900 ] || fail "the compile cache not filled 900 s after ready"
        sleep 1
    done
    filled=$(since "$t0")
    echo "compile cache filled $filled s after the checks"
}

# A start on the filled volume loads every bucket's package and compiles nothing.
check_loaded_packages() {
    local log; log=$(docker logs "$name" 2>&1)
    grep -q "ahead-of-time packages of buckets" <<<"$log" || { echo "$log" | tail -20; fail "no packages loaded"; }
    ! grep -q "torch.compile serves this start" <<<"$log" || fail "the second start missed the compile cache"
    echo "loaded every bucket from the compile cache"
}

# docker stop: SIGTERM, the queued work drained, exit 0 within the stop timeout.
stop_container() {
    docker stop "$name" >/dev/null
    local code log
    code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
    log=$(docker logs "$name" 2>&1)
    echo "$log" >"$state/$1.log"
    [ "$code" = 0 ] || { echo "$log" | tail -30; fail "exit code $code after docker stop (0 expected)"; }
    for line in "shutting down: finishing queued work" "shutdown complete"; do
        grep -qF "$line" <<<"$log" || { echo "$log" | tail -30; fail "no \"$line\" in the log"; }
    done
    ! grep -q Traceback <<<"$log" || fail "a traceback in the log ($state/$1.log)"
    docker rm "$name" >/dev/null
    echo "stopped: exit 0, drained (log: $state/$1.log)"
}

# All of it in one function: bash has read the whole script before it runs, so editing it meanwhile is safe.
main() {
    [ -x "$python" ] || fail "no $python: make venv first (or set PYTHON)"
    mkdir -p "$state"
    exec 9>"$state/lock"
    flock -n 9 || fail "another image test is using $state"
    trap cleanup EXIT
    if [ -z "${DOCKER_HOST:-}" ]; then
        step "starting a Docker engine in $state"
        start_engine
    fi
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        step "making the base image $base (docker/local-base.sh)"
        docker/local-base.sh "$base" >"$state/base.log" 2>&1 || { tail -20 "$state/base.log"; fail "docker/local-base.sh"; }
    fi
    step "the wheel index (requirements/service-cpu.txt) on 127.0.0.1:$wheel_port"
    local_wheels
    step "building $image from $base"
    build
    stop_wheel_index
    docker volume rm "$volume" >/dev/null 2>&1 || true

    step "first start: an empty /cache volume"
    start_container
    first=$ready
    check_container
    wait_for_packages
    stop_container first
    step "second start: the same /cache volume"
    start_container
    second=$ready
    check_loaded_packages
    check_container
    stop_container second

    size=$(docker image inspect -f '{{.Size}}' "$image")
    step "done"
    printf 'image %s: %s GB (%s bytes)\n' "$image" "$(awk -v b="$size" 'BEGIN { printf "%.2f", b / 1e9 }')" "$size"
    printf 'ready after %s s on an empty /cache volume, %s s on the same volume again\n' "$first" "$second"
    printf 'the first start filled the compile cache %s s after its checks\n' "$filled"
    printf 'whole run: %d s\n' $((SECONDS - started))
}

main
