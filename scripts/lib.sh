# Shared settings of BitClone9's scripts: where things live and which ports the local stack uses.
# Sourced by scripts/stack, scripts/test, scripts/quickstart and bench/run.

BC9_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BC9_ROOT
# Downloads and build output survive fresh clones: they live in the user's cache, not in the project.
export BC9_CACHE="${BC9_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bitclone9}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$BC9_CACHE/target}"
# Running services keep their data in a git-ignored folder of the project.
export BC9_STACK_DIR="${BC9_STACK_DIR:-$BC9_ROOT/.stack}"

export BC9_PG_PORT="${BC9_PG_PORT:-5433}"
export BC9_KAFKA_PORT="${BC9_KAFKA_PORT:-9092}"
export BC9_KAFKA_CONTROLLER_PORT="${BC9_KAFKA_CONTROLLER_PORT:-$((BC9_KAFKA_PORT + 1))}"
export BC9_REGISTRY_PORT="${BC9_REGISTRY_PORT:-8081}"
export BC9_REGISTRY_MGMT_PORT="${BC9_REGISTRY_MGMT_PORT:-$((BC9_REGISTRY_PORT + 920))}"
# TLS listeners with authentication, for clients configured like production ones.
export BC9_KAFKA_SECURE_PORT="${BC9_KAFKA_SECURE_PORT:-$((BC9_KAFKA_PORT + 2))}"
export BC9_REGISTRY_SECURE_PORT="${BC9_REGISTRY_SECURE_PORT:-$((BC9_REGISTRY_PORT + 362))}"
export BC9_KAFKA_MTLS_PORT="${BC9_KAFKA_MTLS_PORT:-$((BC9_KAFKA_PORT + 3))}"

# What the stack gives its users (tests, quickstart, benchmarks).
export BC9_PG_SUPERUSER=postgres
export BC9_PG_SUPERPASS="${BC9_PG_SUPERPASS:-bitclone9-admin}"
export BC9_PG_USER=bitclone9
export BC9_PG_PASSWORD="${BC9_PG_PASSWORD:-bitclone9}"
export BC9_KAFKA_BOOTSTRAP="127.0.0.1:${BC9_KAFKA_PORT}"
export BC9_REGISTRY_URL="http://127.0.0.1:${BC9_REGISTRY_PORT}/apis/ccompat/v7"
# The SASL_SSL listener (SCRAM-SHA-512 or PLAIN) and the HTTPS registry with basic auth, both
# with certificates signed by the stack's own CA.
export BC9_TLS_CA="$BC9_STACK_DIR/tls/ca.pem"
export BC9_KAFKA_SECURE_BOOTSTRAP="127.0.0.1:${BC9_KAFKA_SECURE_PORT}"
# The SSL listener that requires a client certificate signed by the stack's CA (.stack/tls/client.*).
export BC9_KAFKA_MTLS_BOOTSTRAP="127.0.0.1:${BC9_KAFKA_MTLS_PORT}"
export BC9_TLS_CLIENT_CERT="$BC9_STACK_DIR/tls/client.crt"
export BC9_TLS_CLIENT_KEY="$BC9_STACK_DIR/tls/client.key"
export BC9_KAFKA_SASL_USER=bitclone9
export BC9_KAFKA_SASL_PASSWORD="${BC9_KAFKA_SASL_PASSWORD:-bitclone9-kafka-secret}"
export BC9_REGISTRY_SECURE_URL="https://localhost:${BC9_REGISTRY_SECURE_PORT}/apis/ccompat/v7"
export BC9_REGISTRY_USER=bitclone9
export BC9_REGISTRY_PASSWORD="${BC9_REGISTRY_PASSWORD:-bitclone9-registry-secret}"

KAFKA_VERSION=4.1.1
APICURIO_VERSION=3.3.3
PG_MAJOR=15

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command as root, with sudo when not root already.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs Debian packages that are missing (one apt-get update per run, only when needed).
apt_ensure() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Makes sure a Rust toolchain with rustfmt and clippy is on PATH.
rust_ensure() {
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  if ! command -v cargo >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || die "cargo and rustup are missing: install Rust (rustup) first"
    rustup default stable
  fi
  if command -v rustup >/dev/null 2>&1; then
    rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
  fi
}

# Everything a build of BitClone9 needs from Debian: clang for RocksDB's bindings, OpenSSL headers for the
# registry client, a C++ compiler for the bundled RocksDB and librdkafka.
build_deps_ensure() {
  apt_ensure build-essential pkg-config clang libclang-dev libssl-dev cmake curl
  rust_ensure
}

# A Python with the independent Avro consumer's packages (fastavro, confluent-kafka), in the
# cache: tests read topics with it as a user's Python consumer would (scripts/read-topic.py).
export BC9_PYTHON="${BC9_PYTHON:-$BC9_CACHE/python/bin/python}"
python_deps_ensure() {
  if [ -x "$BC9_PYTHON" ] && "$BC9_PYTHON" -c 'import fastavro, confluent_kafka' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_ensure python3
  python3 -m venv --help >/dev/null 2>&1 || apt_ensure python3-venv
  log "installing fastavro and confluent-kafka into $BC9_CACHE/python"
  python3 -m venv "$BC9_CACHE/python"
  "$BC9_CACHE/python/bin/pip" install -q fastavro==1.* confluent-kafka==2.*
}
