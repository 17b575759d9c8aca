#!/usr/bin/env bash
# Throwaway TLS material and SuperNode authentication keys for a local or Docker
# Compose deployment of afl_flwr. NOT for production: the CA key sits next to
# the certificates and nothing is password protected.
#
# Usage: docker/generate-certs.sh [OUT_DIR] [NUM_NODES]
#   OUT_DIR    where to write (default: docker/certs next to this script)
#   NUM_NODES  SuperNode key pairs to create (default: 3)
#
# Writes (existing valid files are kept, so the script is idempotent):
#   OUT_DIR/ca.crt, ca.key            self-signed CA (RSA 4096, 365 days)
#   OUT_DIR/server.pem, server.key    SuperLink certificate signed by the CA, SAN
#                                     DNS:localhost, DNS:superlink, IP:127.0.0.1, IP:::1
#   OUT_DIR/supernode-<i>, .pub       ECDSA P-384 OpenSSH key pairs, i = 0..N-1
#                                     (SuperNode i serves partition-id i)
# Private keys are created mode 600, certificates and public keys 644. Flower's
# containers run as UID 49999: see docker/README.md before mounting the keys.
# Extra SAN entries: EXTRA_SAN="DNS:my-host,IP:10.0.0.5" docker/generate-certs.sh ...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/certs}"
num_nodes="${2:-3}"
days="${CERT_DAYS:-365}"
san="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1${EXTRA_SAN:+,$EXTRA_SAN}"

if ! [[ "$num_nodes" =~ ^[0-9]+$ ]]; then
  echo "error: NUM_NODES must be a non-negative integer, got '$num_nodes'" >&2
  exit 2
fi
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' not found" >&2; exit 2; }
done
mkdir -p "$out"
umask 077

# The server certificate must chain to the CA, carry every SAN, and not expire
# within a day; otherwise (or if anything is missing) regenerate CA + server.
server_cert_ok() {
  [[ -s "$out/ca.crt" && -s "$out/ca.key" && -s "$out/server.pem" && -s "$out/server.key" ]] || return 1
  openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null 2>&1 || return 1
  openssl x509 -in "$out/server.pem" -noout -checkend 86400 >/dev/null 2>&1 || return 1
  local have
  have="$(openssl x509 -in "$out/server.pem" -noout -ext subjectAltName 2>/dev/null)"
  have="${have//IP Address:0:0:0:0:0:0:0:1/IP:::1}"
  have="${have//IP Address:/IP:}"
  local entry
  IFS=',' read -ra wanted <<<"$san"
  for entry in "${wanted[@]}"; do
    [[ "$have" == *"$entry"* ]] || return 1
  done
}

if server_cert_ok; then
  echo "Keeping the CA and server certificate in $out"
else
  echo "Creating a CA and a server certificate in $out (SAN $san)"
  openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
  openssl req -new -x509 -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/O=afl-flwr throwaway CA/CN=afl-flwr CA" -out "$out/ca.crt"
  openssl genrsa -out "$out/server.key" 4096 2>/dev/null
  openssl req -new -key "$out/server.key" -subj "/O=afl-flwr/CN=localhost" \
    -out "$out/server.csr"
  extfile="$(mktemp)"
  trap 'rm -f "$extfile"' EXIT
  printf 'subjectAltName = %s\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n' \
    "$san" >"$extfile"
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.pem" -days "$days" -sha256 \
    -extfile "$extfile" 2>/dev/null
  rm -f "$out/server.csr" "$out/ca.srl"
  chmod 644 "$out/ca.crt" "$out/server.pem"
fi

for ((i = 0; i < num_nodes; i++)); do
  key="$out/supernode-$i"
  if [[ -s "$key" && -s "$key.pub" ]] && ssh-keygen -y -f "$key" >/dev/null 2>&1; then
    continue
  fi
  rm -f "$key" "$key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "afl-flwr supernode-$i" -f "$key"
  chmod 644 "$key.pub"
  echo "Created SuperNode key pair $key(.pub)"
done

openssl x509 -in "$out/server.pem" -noout -ext subjectAltName | tail -n +2 | sed 's/^ */Server certificate SAN: /'
