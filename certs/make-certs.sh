#!/usr/bin/env bash
# Makes the throwaway CA and localhost certificate shipped in certs/ (for local use and tests
# only: the CA's key is thrown away, and these files are public, so never use them in
# production). Run from anywhere: ./certs/make-certs.sh
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
  -subj "/CN=project-relay test CA" -keyout "$tmp/ca.key" -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout localhost.key -out "$tmp/localhost.csr"
cat > "$tmp/ext.cnf" <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:relay.localhost,DNS:upstream.test,IP:127.0.0.1,IP:::1,IP:10.231.77.2
EXT
openssl x509 -req -in "$tmp/localhost.csr" -CA ca.crt -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 36500 -extfile "$tmp/ext.cnf" -out localhost.crt
rm -f ca.srl
# 10.231.77.2 is the test host the non-loopback tests make in a network namespace.
# A certificate no one trusts, for the tests of an upstream with a bad certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout ../tests/fixtures/untrusted.key -out ../tests/fixtures/untrusted.crt
